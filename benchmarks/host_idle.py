"""Is host work slower right after the host has been idle? Times, hot and after an idle gap of 0.2-20 ms: a pure-Python
loop, a CUDA event record, an 8 KiB pinned host-to-device copy (enqueue only), and a thread hand-off through a
condition variable (the engine thread's wake-up) followed by the Python loop.

Why: the prefix-cache benchmark's warm request (it arrives after the engine has gone idle) spent 3-10x the hot-loop
time in every step of its host path (docs/benchmarks.md, section 4).

Usage (on the GPU host, after `source .gpu-kit/setup.sh`): python benchmarks/host_idle.py
Prints a table; writes benchmarks/results/host_idle.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table, write_result  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
IDLE_S = (0.0002, 0.001, 0.005, 0.02)


def python_loop() -> int:
    """A fixed bit of pure-Python work (3,000 multiply-adds)."""
    s = 0
    for i in range(3000):
        s += i * i
    return s


def timed_us(fn) -> float:
    """Wall time of one call in microseconds."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def hand_off_us(idle: float, rounds: int = 40) -> tuple[float, float]:
    """Median wake-up of a thread waiting on a condition, notified after `idle` seconds, and of its work after."""
    cv, box, out = threading.Condition(), [], []

    def worker():
        while True:
            with cv:
                cv.wait_for(lambda: box)
                t0 = box.pop()
            if t0 is None:
                return
            out.append(((time.perf_counter() - t0) * 1e6, timed_us(python_loop)))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    for _ in range(rounds):
        time.sleep(idle)
        with cv:
            box.append(time.perf_counter())
            cv.notify()
        time.sleep(0.003)
    with cv:
        box.append(None)
        cv.notify()
    thread.join()
    return statistics.median(w for w, _ in out), statistics.median(k for _, k in out)


def main() -> None:
    """Time each operation hot and after each idle gap; print and record the medians."""
    host = torch.zeros(2048, dtype=torch.int32).pin_memory()
    dev = torch.zeros(2048, dtype=torch.int32, device="cuda")
    ops = {
        "python loop": python_loop,
        "CUDA event record": lambda: torch.cuda.Event().record(),
        "pinned H2D copy (enqueue)": lambda: dev.copy_(host, non_blocking=True),
    }
    torch.cuda.synchronize()
    rows = []
    for name, fn in ops.items():
        for _ in range(200):
            fn()
        row = {"operation": name, "hot_us": statistics.median(timed_us(fn) for _ in range(200))}
        for idle in IDLE_S:
            samples = []
            for _ in range(40):
                time.sleep(idle)
                samples.append(timed_us(fn))
            row[f"after_{idle * 1e3:g}ms_us"] = statistics.median(samples)
        rows.append(row)
    wake = {"operation": "thread wake-up (hand-off)", "hot_us": float("nan")}
    work = {"operation": "python loop after the wake-up", "hot_us": float("nan")}
    for idle in IDLE_S:
        wake[f"after_{idle * 1e3:g}ms_us"], work[f"after_{idle * 1e3:g}ms_us"] = hand_off_us(idle)
    rows += [wake, work]
    print_table("host time (us, medians): hot, and after the host idled for the given gap", rows)
    write_result("host_idle", {"rows": rows}, OUT)


if __name__ == "__main__":
    main()
