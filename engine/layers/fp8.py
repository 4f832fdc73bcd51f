"""FP8 weights (`quantization="fp8"`): the decoder layers' projections stored as float8 e4m3 with one scale per
output row, activations and everything else in the model dtype (weight-only quantization, as vLLM's FP8 Marlin
kernels; its "fp8" on Hopper also quantizes the activations, for cuBLASLt / CUTLASS FP8 GEMMs).

Why: a decode step streams every weight once, so its time follows the weights' bytes; FP8 halves the projections'
bytes. Steps of up to MAX_FP8_ROWS token rows run the engine's Triton GEMV and few-row kernels, which read the FP8
weight, widen it in registers and apply the row scale after the sum (each projection's tile shape per row count
chosen by timing at start-up, `tune_fp8_rows`); larger steps (prefill chunks) widen the weight to the model dtype
and run cuBLAS, an extra pass over the weight. Measured on an H200 (docs/benchmarks.md): batch-1 decode of Qwen3-8B
1.41x faster than bf16, of Qwen3-0.6B (bound by kernel latency, not bytes) 1.01x. At 33-256 rows the Triton kernel
is 1.2-5.5x faster than widening but still slower than cuBLAS on bf16 weights, so FP8 suits one user or a few on a
large model, bf16 a server of many.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

from engine.layers.gemv import (
    FP8_ROWS_CONFIGS,
    ROLES,
    _launch,
    _launch_rows,
    _role_modules,
    _time_role,
    configs_for,
    rows_configs_for,
    rows_tile,
)

logger = logging.getLogger("engine")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
# Triton widens FP8 in hardware from sm89 (Ada, Hopper) on.
MIN_CAPABILITY = (8, 9)
QUANTIZED_ROLES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# Steps of more rows widen the weight for cuBLAS: at 256 rows the Triton kernel was still 1.3-3.2x faster than that
# (H200), but its accumulator holds a program's whole row tile, so 256 rows is as far as it goes.
MAX_FP8_ROWS = max(FP8_ROWS_CONFIGS)


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why quantization="fp8" cannot run on this device and dtype, or None when it can."""
    from engine.layers.kernels import triton_available

    if device.type != "cuda":
        return f"quantization='fp8' needs a CUDA GPU (this engine runs on {device.type})"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"quantization='fp8' needs compute capability 8.9 or newer (Ada, Hopper); this GPU has {capability}"
    if not triton_available():
        return "quantization='fp8' runs its projections as Triton kernels; install triton (it comes with torch)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"quantization='fp8' keeps activations in bfloat16 or float16, not {str(dtype).removeprefix('torch.')}"
    return None


@torch.no_grad()
def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, scale): weight [out, in] as float8 e4m3 and one fp32 scale per output row, w ~ w8 * scale[:, None].

    Each row's largest magnitude maps to FP8_MAX, so no value saturates and small rows keep their precision."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    w8 = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return w8, scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight FP8 stands for, in dtype: w8 * scale per row (what an HF reference model is given in tests)."""
    return (w8.float() * scale[:, None]).to(dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    configs: dict[int, tuple] | None = None,
) -> torch.Tensor:
    """x @ (weight * scale)^T + bias for an FP8 weight: the Triton kernels up to MAX_FP8_ROWS token rows (with
    configs[row tile] when given, as tune_fp8_rows chose), else cuBLAS on the weight widened to x's dtype."""
    rows, k = x.shape
    if x.is_cuda and rows <= MAX_FP8_ROWS:
        tile = 1 if rows == 1 else rows_tile(rows)
        cfg = (configs or {}).get(tile) or _default_config(weight.shape[0], k, tile)
        if cfg is not None:
            return (_launch if rows == 1 else _launch_rows)(x, weight, cfg, bias=bias, scale=scale)[0]
    # Widening is exact (every e4m3 value is a bf16/fp16 value); the row scale then applies to the output columns,
    # multiplied in fp32 (an in-place op computes in the promoted dtype). A scale rounded to bf16 skews each column
    # by up to 0.2%: on the Llama-shaped GPU parity model the worst logit error against HF was 2.1e-2 that way,
    # 1.8e-2 this way (1.5e-2 with bf16 weights; H200, docs/benchmarks.md).
    y = F.linear(x, weight.to(x.dtype)).mul_(scale)
    return y if bias is None else y.add_(bias)


@functools.cache
def _default_config(n: int, k: int, tile: int) -> tuple | None:
    # Eager steps call fp8_linear once per projection: look the shape's first fitting configuration up once.
    configs = configs_for(n, k) if tile == 1 else rows_configs_for(n, k, FP8_ROWS_CONFIGS[tile])
    if not configs and tile <= 32:  # a shape the FP8 tiles do not divide: the bf16 ones may
        configs = rows_configs_for(n, k)
    return configs[0] if configs else None


@torch.inference_mode()
def tune_fp8_rows(layers, stream_bytes: int) -> dict[str, dict[int, tuple]]:
    """Per FP8 projection role and row tile, the faster of FP8_ROWS_CONFIGS' pair, timed over the layers' own
    weights (up to stream_bytes of them); each layer's Linear keeps its role's choice (`fp8_configs`)."""
    start = time.perf_counter()
    plans: dict[str, dict[int, tuple]] = {}
    notes = []
    for role in ROLES:
        linears = [_role_modules(layer)[role][1] for layer in layers]
        w0 = linears[0].weight
        if w0.element_size() != 1:
            continue
        mods = [(None, lin, None) for lin in linears[: -(-stream_bytes // (w0.numel() + w0.shape[0] * 4))]]
        plan = plans[role] = {}
        for tile, pair in FP8_ROWS_CONFIGS.items():
            fits = rows_configs_for(w0.shape[0], w0.shape[1], pair)
            if len(fits) == 1:
                plan[tile] = fits[0]
            elif fits:
                _, times = _time_role(mods, fits, tile)
                if times:
                    plan[tile] = min(times, key=times.get)
        for lin in linears:
            lin.fp8_configs = plan
        notes.append(f"{role} " + " ".join(f"{t}:{FP8_ROWS_CONFIGS[t].index(c) + 1}" for t, c in plan.items()))
    if notes:
        elapsed = time.perf_counter() - start
        logger.info(
            "FP8 GEMMs (timed in %.1fs), FP8_ROWS_CONFIGS' shape 1 or 2 per row tile: %s", elapsed, "; ".join(notes)
        )
    return plans


@torch.no_grad()
def quantize_model_fp8(model: torch.nn.Module) -> int:
    """Store every decoder layer's projections as FP8 with row scales; returns the bytes this freed."""
    freed = 0
    for layer in model.layers:
        for path in QUANTIZED_ROLES:
            linear = layer.get_submodule(path)
            w8, scale = quantize_fp8(linear.weight)
            freed += linear.weight.numel() * linear.weight.element_size() - w8.numel() - scale.numel() * 4
            linear.act_dtype = linear.weight.dtype  # the activations' dtype: the start-up timings use it
            linear.weight = torch.nn.Parameter(w8, requires_grad=False)
            linear.weight_scale = scale
    torch.cuda.empty_cache()
    logger.info("FP8 weights: the decoder layers' projections take %.2f GiB less", freed / 2**30)
    return freed
