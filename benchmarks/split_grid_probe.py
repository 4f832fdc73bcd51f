"""Decode attention alone, per launch: the split-KV Triton kernel with the mean split (grids of 16, 4, 2 and 1
splits per KV head) against FlashInfer's unsplit tensor-core decode, over batch sizes and uniform contexts.

Why: in `gpu_bench.py decode_ab` the Triton twin of the 96-request graph lost to FlashInfer's unsplit graph by
3-8% at contexts of 385-1,024 tokens while it won at 64, 128 and 160 (docs/benchmarks.md, section 6). With the mean
split and contexts of one length every request needs one program per KV head, yet the grid holds 16 per head, so
15 of 16 programs exit at once; this measures what they cost, and whether the 96-row dip is the kernel's.

Usage (GPU host): python benchmarks/split_grid_probe.py [--rows 64 96 128] [--contexts 384 896] [--heads 32 8
--head-dim 64]
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

BS = 64  # the engine's page size on the FlashInfer path


def time_us(fn, caches: list[torch.Tensor], reps: int) -> float:
    """µs per call of fn(cache), cycling the distinct caches (so no launch reads KV another left in L2) in one CUDA
    graph of about reps calls: the kernels' own time, without the host's launch cost, which at head_dim 64 is longer
    than the kernels (a host-launched loop timed ~50-65 µs per call for every batch size)."""
    from engine.layers.linear import graph_time_us

    def run():
        for cache in caches:
            fn(cache)

    return graph_time_us(run, max(1, reps // len(caches))) / len(caches)


def attend(kernel: SplitDecode, q: torch.Tensor, tables: tuple, cache: torch.Tensor) -> torch.Tensor:
    """The Triton kernel over one cache with the given page table."""
    return kernel(q, cache, *tables)


def main() -> None:
    """Print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[48, 64, 80, 96, 112, 128, 160, 192])
    parser.add_argument("--contexts", nargs="+", type=int, default=[384, 896])
    parser.add_argument("--splits", nargs="+", type=int, default=[16, 4, 2, 1])
    parser.add_argument("--plain-splits", nargs="+", type=int, default=[], help="splits without the mean split")
    parser.add_argument("--reps", type=int, default=40, help="calls per timed graph")
    parser.add_argument("--layers", type=int, default=4, help="distinct KV caches cycled")
    parser.add_argument("--heads", nargs=2, type=int, default=[16, 8], help="query and KV heads (Qwen3-0.6B's)")
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args()
    (HQ, HKV), D = args.heads, args.head_dim
    import flashinfer

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    pages_needed = max(args.rows) * -(-max(args.contexts) // BS)
    caches = [torch.randn(pages_needed, 2, HKV, BS, D, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
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
                out = kernel(q, caches[0], indptr, perm, last)
                ref = out if ref is None else ref
                assert torch.allclose(out.float(), ref.float(), atol=2e-2), "splits disagree"
                name = f"triton_s{s}_us" if mean else f"triton_plain_s{s}_us"
                row[name] = time_us(functools.partial(attend, kernel, q, (indptr, perm, last)), caches, args.reps)
                row.setdefault("resident_per_sm", kernel.resident_per_sm())  # the driver's count, first variant
            fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "HND", use_tensor_cores=True, backend="fa2", use_cuda_graph=True,
                paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=perm, paged_kv_last_page_len_buffer=last,
            )  # fmt: skip
            fi.plan(indptr, perm, last, HQ, HKV, D, BS, disable_split_kv=True,
                    q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)  # fmt: skip
            assert torch.allclose(fi.run(q, caches[0]).float(), ref.float(), atol=2e-2), "FlashInfer disagrees"
            row["flashinfer_unsplit_us"] = time_us(functools.partial(fi.run, q), caches, args.reps)
            kv_bytes = rows * ctx * HKV * D * 2 * 2
            row["triton_tb_s"] = kv_bytes / row[f"triton_s{args.splits[0]}_us"] / 1e6
            row["flashinfer_tb_s"] = kv_bytes / row["flashinfer_unsplit_us"] / 1e6
            rows_out.append(row)
            print(row, flush=True)
    print_table(f"decode attention per launch (µs), {HQ}/{HKV} heads of {D}, uniform contexts, {sms} SMs", rows_out)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    write_result("split_grid_probe", {"heads": [HQ, HKV], "head_dim": D, "rows": rows_out}, out)


if __name__ == "__main__":
    main()
