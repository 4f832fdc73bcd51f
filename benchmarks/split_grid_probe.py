"""Decode attention alone, per launch: the split-KV Triton kernel with the mean split (grids of 16, 4, 2 and 1
splits per KV head) against FlashInfer's unsplit tensor-core decode, over batch sizes and uniform contexts.

Why: in `gpu_bench.py decode_ab` the Triton twin of the 96-request graph lost to FlashInfer's unsplit graph by
3-8% at contexts of 385-1,024 tokens while it won at 64, 128 and 160 (docs/benchmarks.md, section 6). With the mean
split and contexts of one length every request needs one program per KV head, yet the grid holds 16 per head, so
15 of 16 programs exit at once; this measures what they cost, and whether the 96-row dip is the kernel's.

Usage (GPU host): python benchmarks/split_grid_probe.py [--rows 64 96 128] [--contexts 384 896]
Writes benchmarks/results/split_grid_probe.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent))

from common import print_table, write_result  # noqa: E402

from engine.attention.triton_decode import SplitDecode  # noqa: E402

HQ, HKV, D, BS = 16, 8, 128, 64  # Qwen3-0.6B's attention, the engine's page size on the FlashInfer path


def time_us(fn, reps: int) -> float:
    """Mean µs per call over reps calls after a warm-up (one stream; each call is a kernel of tens of µs)."""
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / reps


def main() -> None:
    """Print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[48, 64, 80, 96, 112, 128, 160, 192])
    parser.add_argument("--contexts", nargs="+", type=int, default=[384, 896])
    parser.add_argument("--splits", nargs="+", type=int, default=[16, 4, 2, 1])
    parser.add_argument("--plain-splits", nargs="+", type=int, default=[], help="splits without the mean split")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    import flashinfer

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    pages_needed = max(args.rows) * -(-max(args.contexts) // BS)
    cache = torch.randn(pages_needed, 2, HKV, BS, D, device=dev, dtype=torch.bfloat16)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    rows_out = []
    for ctx in args.contexts:
        pages = -(-ctx // BS)
        for rows in args.rows:
            # Each request's pages scattered over the cache, as after many allocations.
            perm = torch.randperm(pages_needed, device=dev)[: rows * pages].to(torch.int32)
            indptr = torch.arange(0, rows * pages + 1, pages, dtype=torch.int32, device=dev)
            last = torch.full((rows,), ctx - (pages - 1) * BS, dtype=torch.int32, device=dev)
            q = torch.randn(rows, HQ, D, device=dev, dtype=torch.bfloat16)
            row = dict(rows=rows, context=ctx, programs_working=rows * HKV)
            ref = None
            variants = [(s, True) for s in args.splits] + [(s, False) for s in args.plain_splits]
            for s, mean in variants:
                kernel = SplitDecode(rows, HQ, HKV, D, dev, sms, splits=s, mean_chunk=mean)
                out = kernel(q, cache, indptr, perm, last)
                ref = out if ref is None else ref
                assert torch.allclose(out.float(), ref.float(), atol=2e-2), "splits disagree"
                name = f"triton_s{s}_us" if mean else f"triton_plain_s{s}_us"
                row[name] = time_us(functools.partial(kernel, q, cache, indptr, perm, last), args.reps)
            fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=True, backend="fa2")
            fi.plan(indptr, perm, last, HQ, HKV, D, BS, disable_split_kv=True,
                    q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)  # fmt: skip
            assert torch.allclose(fi.run(q, cache).float(), ref.float(), atol=2e-2), "FlashInfer disagrees"
            row["flashinfer_unsplit_us"] = time_us(functools.partial(fi.run, q, cache), args.reps)
            kv_bytes = rows * ctx * HKV * D * 2 * 2
            row["triton_tb_s"] = kv_bytes / row[f"triton_s{args.splits[0]}_us"] / 1e6
            row["flashinfer_tb_s"] = kv_bytes / row["flashinfer_unsplit_us"] / 1e6
            rows_out.append(row)
            print(row, flush=True)
    print_table(f"decode attention per launch (µs), {HQ}/{HKV} heads, uniform contexts, {sms} SMs", rows_out)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    write_result("split_grid_probe", {"rows": rows_out}, out)


if __name__ == "__main__":
    main()
