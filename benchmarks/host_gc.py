"""Garbage-collection pauses while serving, with and without freezing the start-up heap (EngineConfig.freeze_gc).

Each variant runs in a fresh process: a small random Qwen3 on the CPU (the engine's host path is the same Python on
any device), then rounds of the shared_prefix benchmark's shape: a new 4,096-token document enters the prefix cache,
and 64 requests on it, each with its own 64-token question, generate 2 tokens. Every collection inside a round is
timed through gc.callbacks, by generation.

Why: a full collection scans every tracked object of the process (torch, transformers, the model's modules: some
340k objects), and one landed inside a 64-request round on the CI machine; gc.freeze() takes the start-up heap out of
every later collection, as vLLM does.

Usage: python benchmarks/host_gc.py [--rounds 12]
Prints a table; writes benchmarks/results/host_gc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import print_table, write_result  # noqa: E402

OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
ROOT = Path(__file__).parent.parent


def run_rounds(rounds: int, freeze: bool) -> dict:
    """In this process: an engine with freeze_gc as given, then the rounds; per round its wall time and GC pauses."""
    import gc
    import random
    import time

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_tokenizer
    from transformers import Qwen3Config

    from engine import LLM, SamplingParams

    folder = Path(tempfile.mkdtemp())
    Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=32000, max_position_embeddings=8192,
    ).save_pretrained(folder)  # fmt: skip
    tiny_tokenizer().save_pretrained(folder)
    llm = LLM(str(folder), load_format="dummy", max_model_len=8192, max_num_seqs=64, block_size=64, device="cpu",
              freeze_gc=freeze)  # fmt: skip
    pauses: list[tuple[int, float]] = []
    start = [0.0]

    def on_gc(phase, info):
        """Time each collection."""
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - start[0]) * 1e3))

    gc.callbacks.append(on_gc)
    rng = random.Random(0)
    rows = []
    for r in range(rounds):
        doc = [rng.randrange(10, 30000) for _ in range(4096)]
        llm.generate([doc + [5]], SamplingParams(max_tokens=1))
        prompts = [doc + [rng.randrange(10, 30000) for _ in range(64)] for _ in range(64)]
        pauses.clear()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        wall = (time.perf_counter() - t) * 1e3
        row = dict(round=r, wall_ms=wall, frozen_objects=gc.get_freeze_count())
        for g in range(3):
            row[f"gen{g}_n"] = sum(1 for gen, _ in pauses if gen == g)
            row[f"gen{g}_ms"] = sum(ms for gen, ms in pauses if gen == g)
        rows.append(row)
    gc.callbacks.remove(on_gc)
    llm.shutdown()
    return {"rows": rows}


def main() -> None:
    """Run both variants in fresh processes and compare."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_rounds(args.rounds, args.child == "1")))
        return
    rows, summary = [], []
    for freeze in (False, True):
        cmd = [sys.executable, __file__, "--rounds", str(args.rounds), "--child", "1" if freeze else "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for row in result["rows"]:
            rows.append(dict(freeze_gc=freeze, **row))
        mine = [r for r in rows if r["freeze_gc"] == freeze]
        summary.append(
            dict(
                freeze_gc=freeze,
                rounds=len(mine),
                full_collections=sum(r["gen2_n"] for r in mine),
                full_ms=sum(r["gen2_ms"] for r in mine),
                young_ms=sum(r["gen0_ms"] + r["gen1_ms"] for r in mine),
                worst_round_gc_ms=max(r["gen0_ms"] + r["gen1_ms"] + r["gen2_ms"] for r in mine),
                frozen_objects=mine[-1]["frozen_objects"],
            )
        )
    print_table("GC pauses per round (ms): 64 requests over a cached 4,096-token document, CPU", rows)
    print_table("GC pauses over all rounds", summary)
    write_result("host_gc", {"rounds": rows, "summary": summary}, OUT)


if __name__ == "__main__":
    main()
