"""Linear layers: weights packed from several checkpoint tensors (QKV, gate/up), and pre-packed for oneDNN on the
CPU."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("engine")


class Linear(nn.Linear):
    """nn.Linear that runs oneDNN on a weight pre-packed once when pack_cpu_linears() has packed it."""

    onednn_weight: torch.Tensor | None = None
    # One scale per output row when the weight is stored as FP8 (engine/layers/fp8.py), else None; and the FP8
    # kernel's configuration per row tile that start-up timing chose (fp8.tune_fp8_rows), else None, for bf16
    # activations and for FP8 ones (None in that dict: cuBLASLt's FP8 GEMM).
    weight_scale: torch.Tensor | None = None
    fp8_configs: dict[int, tuple] | None = None
    fp8_act_configs: dict[int, tuple | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T + b."""
        if self.weight_scale is not None:
            from engine.layers.fp8 import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.fp8_configs, self.fp8_act_configs)
        if self.onednn_weight is not None:
            return onednn_linear(x, self.onednn_weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) with W pre-packed by torch.ops.mkldnn._reorder_linear_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] in oneDNN's blocked layout, or None when this torch build or dtype cannot."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return None
    try:
        # The batch-size hint only picks the blocking; the packed weight serves any number of rows.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size=16)
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
        onednn_linear(probe, packed)
    except (RuntimeError, AttributeError):  # bf16 without oneDNN bf16 support; a torch build without the ops
        return None
    return packed


@torch.no_grad()
def pack_cpu_linears(model: nn.Module) -> int:
    """Pre-pack every Linear's weight for oneDNN and free the dense copy; returns how many were packed.

    Why: on the CPU, torch's default fp32 GEMM (MKL, dense weight) is 1.9-3x slower than oneDNN on a pre-packed
    weight for the engine's shapes (16 rows: gate/up 0.62 vs 0.33 ms, a 49k-token lm_head 23.6 vs 8.0 ms on 2
    cores); the results agree to fp32 rounding. This is what torch.compile's CPU backend does with frozen weights.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.onednn_weight is None:
            packed = onednn_pack(m.weight)
            if packed is None:
                return count
            m.onednn_weight = packed
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)  # the packed copy is the only one used now
            count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights, counting oneDNN-packed copies (whose dense parameters were freed) and FP8
    weights' row scales."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    packed = [m.onednn_weight for m in linears] + [m.weight_scale for m in linears]
    packed.append(getattr(model, "tied_head_onednn", None))
    return total + sum(w.numel() * w.element_size() for w in packed if w is not None)


class PackedLinear(Linear):
    """A linear layer made of named shards stacked on the output axis, each loaded separately."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (weight or bias) into its rows of the packed parameter."""
        offset, size = self.shard_offsets[shard]
        param = getattr(self, param_name)
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} of {param_name} has {tensor.shape[0]} rows, expected {size}")
        with torch.no_grad():
            param[offset : offset + size].copy_(tensor)


def replay_us(graph: torch.cuda.CUDAGraph, replays: int = 1) -> float:
    """Microseconds per replay of a captured graph, replayed `replays` times back to back (best of 3 runs)."""
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / replays)
    return best


def graph_time_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn, run reps times back-to-back in one CUDA graph (best of 3 replays): the
    kernels' own time, without launch gaps."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return replay_us(graph) / reps


# Bytes of weights each timed GEMM sequence streams: more than a Hopper L2 (50 MB), so every GEMM reads its weight
# from HBM as in a model step. Timing one weight over and over measures it L2-resident, which misranked layouts.
TUNE_STREAM_BYTES = 256 << 20
# A layout must beat the other by this much at M=1 (and not lose by it at M=512) to be chosen: above timing noise.
TUNE_MARGIN = 0.03


def cycle_time_us(calls: list[Callable[[], object]], total: int = 20) -> float:
    """Microseconds per call, running the calls in turn (at least `total` calls) in one CUDA graph."""
    passes = max(1, -(-total // len(calls)))

    def run():
        for call in calls:
            call()

    return graph_time_us(run, passes) / len(calls)


def compile_threads() -> int:
    """NANOVLLM_COMPILE_THREADS: how many candidate kernels the start-up timings run at once the first time, so
    that Triton compiles them in parallel (default: the CPU count, at most 16; 1: one at a time)."""
    from engine.config import env_whole_number

    return max(1, env_whole_number("NANOVLLM_COMPILE_THREADS", min(16, os.cpu_count() or 1), "threads"))


def warm_in_threads(calls: list[Callable[[], object]], device: torch.device) -> None:
    """Run each call once, up to compile_threads() at a time, and wait for the device: the first launch of a Triton
    configuration compiles it, and its compiler (LLVM, ptxas in a subprocess) mostly runs outside the GIL, so the
    candidates a start-up timing tries compile side by side instead of one after another (on a fresh Triton cache
    that was most of a start-up: docs/benchmarks.md). On CUDA the kernels not in Triton's cache compile in separate
    processes first (engine/compile_pool.py), and the threads load them. A call that raises is left to the timing
    that follows, which raises or skips it as it would have anyway."""
    threads = min(compile_threads(), len(calls))
    if threads <= 1:
        return

    # Inference mode and the current CUDA device are per thread: each worker takes the caller's device.
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()

    def run(call: Callable[[], object]) -> None:
        if index is not None:
            torch.cuda.set_device(index)
        with torch.inference_mode():
            try:
                call()
            except Exception:  # noqa: BLE001 - see the docstring
                logger.debug("warm-up call failed; the timing runs it again", exc_info=True)

    compiled = 0
    if device.type == "cuda":
        from engine.compile_pool import compile_ahead

        compiled = compile_ahead(calls, run)  # what is not in Triton's cache compiles in separate processes
    start = time.perf_counter()
    run(calls[0])  # one launch first: Triton's per-device caches of this kernel are then set up once, not per thread
    with ThreadPoolExecutor(threads, thread_name_prefix="nanovllm-compile") as pool:
        list(pool.map(run, calls[1:]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if compiled:
        logger.info("%d launches loaded their kernels in %.1fs", len(calls), time.perf_counter() - start)


def stream_time_us(weights: list[torch.Tensor], x: torch.Tensor) -> float:
    """Microseconds per F.linear(x, w), cycling through weights (distinct tensors) in one CUDA graph."""
    return cycle_time_us([functools.partial(F.linear, x, w) for w in weights])


@torch.inference_mode()
def tune_weight_layouts(model: nn.Module) -> dict[tuple[int, int], str]:
    """Per linear weight shape, store it row-major or column-major, whichever cuBLAS runs faster for a decode
    step (M=1) without being slower for a prefill chunk (M=512). Returns {(out, in): "row" | "col"}.

    Why: for some shapes cuBLAS's M=1 kernel is much slower in one layout (Qwen3-0.6B o_proj, 1024x2048:
    12.4 us row-major vs 5.1 us column-major on an H200; Qwen3-8B gate/up 72.6 vs 67.5 us on an H100).
    F.linear takes either layout without a copy. Each shape is timed over its layers' own weights (up to
    TUNE_STREAM_BYTES of them), so the weights stream from memory as they do in a step.
    """
    # FP8 weights keep the row-major layout the engine's FP8 kernels read.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.element_size() > 1]
    if not linears or linears[0].weight.device.type != "cuda":
        return {}
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in linears:
        by_shape.setdefault(tuple(m.weight.shape), []).append(m.weight.detach())
    choice: dict[tuple[int, int], str] = {}
    notes = []
    for shape, weights in by_shape.items():
        rows_major = weights[: -(-TUNE_STREAM_BYTES // (weights[0].numel() * weights[0].element_size()))]
        cols_major = [w.t().contiguous().t() for w in rows_major]
        times = {}
        for rows in (1, 512):
            x = torch.randn(rows, shape[1], device=weights[0].device, dtype=weights[0].dtype)
            times[rows] = [stream_time_us(ws, x) for ws in (rows_major, cols_major)]
        del cols_major
        decode_ratio, prefill_ratio = times[1][1] / times[1][0], times[512][1] / times[512][0]
        col_better = decode_ratio < 1 - TUNE_MARGIN and prefill_ratio <= 1 + TUNE_MARGIN
        choice[shape] = "col" if col_better else "row"
        notes.append(f"{shape}: {choice[shape]} (column-major / row-major time {decode_ratio:.2f} at M=1)")
    logger.info("weight layouts by measured GEMM speed: %s", "; ".join(notes))
    for m in linears:
        if choice[tuple(m.weight.shape)] == "col":
            m.weight.data = m.weight.data.t().contiguous().t()
    return choice
