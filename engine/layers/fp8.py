"""FP8 weights (`quantization="fp8"`): the decoder layers' projections stored as float8 e4m3 with one scale per
output row; everything else in the model dtype. One-row steps (batch-1 decode) keep the activations in the model
dtype (weight-only, as vLLM's FP8 Marlin kernels); steps of ACT_MIN_ROWS (2) or more rows quantize them per token
row too (W8A8, as vLLM's "fp8" on Hopper) for an FP8 x FP8 GEMM.

Why: a decode step streams every weight once, so its time follows the weights' bytes; FP8 halves the projections'
bytes. One row runs the engine's Triton GEMV, which reads the FP8 weight, widens it in registers and applies the
row scale after the sum. From 2 rows on, a Triton kernel quantizes each activation row, and the FP8 activations
and weight meet on the tensor cores as they are: up to MAX_ACT_ROWS (128) rows in the few-row Triton kernel with
the weight on the MMA's long side (engine/layers/gemv.py, X8; tile shapes per projection and row tile chosen by
timing at start-up, `tune_fp8_rows`), past that in cuBLASLt's FP8 GEMM (`torch._scaled_mm`). Widening the weight
in registers kept the few-row kernels at ~1.5-2.5 TB/s, and cuBLASLt's FP8 GEMM is slow at few rows (1.2-2.4x the
Triton kernel's time at 1-64 rows, H200). The decoder layer quantizes inside the add + RMSNorm before qkv and
gate/up and the SwiGLU before down (`norm_fp8_linear`, `silu_fp8_linear`): a launch and a bf16 pass fewer per
projection; only o's input gets a kernel of its own (`quantize_rows`).

Measured on an H200 (docs/benchmarks.md): batch-1 decode of Qwen3-8B 1.41x faster than bf16, of Qwen3-0.6B (bound
by kernel latency, not bytes) 1.01x; decode of Qwen3-8B at 16 / 64 / 128 requests 1.34x / 1.20x / 1.06x faster
with the Triton FP8 x FP8 kernel than with the weight-only kernel or cuBLASLt before it, and at 256 requests 1.26x
bf16. Quantizing the activations costs accuracy about as much as quantizing the weights did
(tests/gpu/test_gpu_parity.py); NANOVLLM_FP8_ACT_MIN_ROWS=0 keeps them in bf16.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

from engine.config import env_choice, env_whole_number
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
    time_candidates,
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
# FP8 activations of up to MAX_ACT_ROWS token rows meet the FP8 weight in the few-row Triton kernel
# (engine/layers/gemv.py, X8): per row tile, the (weight rows per program, K step, warps, stages, K splits) shapes
# start-up timing chooses from per projection (tune_fp8_rows), or cuBLASLt's FP8 GEMM where that is faster; the
# first fitting shape is the default. From `gpu_profile.py fp8rows` over Qwen3-0.6B and Qwen3-8B (H200,
# docs/benchmarks.md): at 1-64 rows the best of each set is within 0-7% of the fastest of the 14 swept shapes and
# 1.1-2.4x faster than cuBLASLt; at 128 rows cuBLASLt still wins for some projections, and from 256 rows for all
# (the kernel's accumulator holds a program's whole row tile).
FP8_ACT_CONFIGS = {
    16: ((64, 256, 4, 3, 2), (128, 128, 8, 4, 1), (64, 128, 4, 3, 8)),
    32: ((64, 256, 4, 3, 2), (128, 128, 8, 4, 1), (64, 128, 4, 3, 4)),
    64: ((64, 256, 4, 3, 2), (64, 128, 4, 3, 4), (64, 256, 4, 2, 1)),
    128: ((64, 256, 4, 3, 2), (64, 128, 4, 3, 1), (64, 128, 4, 4, 2)),
}
MAX_ACT_ROWS = max(FP8_ACT_CONFIGS)
# More shapes of that kernel for `gpu_profile.py fp8rows`, which measures them against cuBLASLt's FP8 GEMM.
SWEEP_FP8_ACT_CONFIGS = (
    (64, 128, 4, 3, 1), (64, 128, 4, 4, 2), (64, 128, 4, 3, 4), (64, 128, 4, 3, 8), (64, 256, 4, 2, 1),
    (64, 256, 4, 3, 2), (64, 256, 4, 2, 4), (128, 128, 4, 3, 1), (128, 128, 8, 3, 2), (128, 128, 8, 4, 1),
    (128, 256, 8, 2, 1), (128, 256, 8, 2, 2), (128, 128, 8, 3, 4), (64, 512, 4, 2, 2),
)  # fmt: skip


def act_min_rows() -> int:
    """NANOVLLM_FP8_ACT_MIN_ROWS: steps of at least this many token rows quantize the activations per token too
    for an FP8 x FP8 GEMM (default 2: one-row steps keep bf16 activations; 0: never, such steps then take the
    Triton kernels or widen the weight)."""
    return env_whole_number("NANOVLLM_FP8_ACT_MIN_ROWS", 2, "token rows")


# Read once at import: fp8_linear runs per projection of every eager step.
ACT_MIN_ROWS = act_min_rows()


def fused_quantize() -> bool:
    """NANOVLLM_FP8_FUSED_QUANT: "1" (default) quantizes the FP8 activations of the qkv, gate/up and down
    projections inside the add + RMSNorm and SwiGLU kernels before them; "0" in kernels of their own (A/B runs)."""
    return env_choice("NANOVLLM_FP8_FUSED_QUANT", "1", ("0", "1")) == "1"


FUSED_QUANTIZE = fused_quantize()


def fast_accumulation() -> bool:
    """NANOVLLM_FP8_FAST_ACCUM: "1" (default) lets cuBLASLt's FP8 GEMM (steps of more than MAX_ACT_ROWS rows)
    accumulate in the tensor cores' own precision without promoting partial sums to fp32 (`use_fast_accum`, as
    vLLM's CUTLASS FP8 kernels do); "0" promotes them. Measured on an H200: 8-10% off a layer's projections at
    1,024-4,096 rows, +3.4% Qwen3-8B decode at 256 requests, the same parity against HF, and within 1e-2 of the
    exact product at K up to 12,288 (tests/gpu/test_gemv.py)."""
    return env_choice("NANOVLLM_FP8_FAST_ACCUM", "1", ("0", "1")) == "1"


FAST_ACCUM = fast_accumulation()


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


def _row_warps(block: int) -> int:
    # One program holds a whole row: 8-32 fp32 values per thread keep it in registers without spilling (a fixed 8
    # warps left 64 per thread at Qwen3-8B's 12,288-wide down rows, where the kernel moved ~1.1 TB/s).
    return min(16, max(4, block // 512))


# What the quantizing kernel computes before it quantizes a row (its MODE).
PLAIN, ADD_RMSNORM, SILU_MUL = 0, 1, 2


@functools.cache
def _build_quantize_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_kernel(
        x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, stride_r, eps,
        MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr,
    ):  # fmt: skip
        # One program per token row, the whole row in registers (K <= BLOCK_K).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        inside = cols < K
        v = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
        if MODE == 1:
            # x + residual, stored as the new residual in the model dtype; RMSNorm of that sum in fp32, rounded
            # once to the model dtype (as FlashInfer's fused_add_rmsnorm writes it).
            if HAS_RESIDUAL:
                r_at = r_ptr + row * stride_r + cols
                v = (v.to(tl.float32) + tl.load(r_at, mask=inside, other=0.0).to(tl.float32)).to(v.dtype)
                tl.store(r_at, v, mask=inside)
            y = v.to(tl.float32)
            inv_rms = tl.math.rsqrt(tl.sum(y * y, axis=0) / K + eps)
            w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            y = (y * inv_rms * w).to(v.dtype).to(tl.float32)
        elif MODE == 2:
            # silu(gate) * up in fp32 over a packed [gate | up] row, rounded once to the model dtype (as
            # FlashInfer's silu_and_mul writes it).
            gate = v.to(tl.float32)
            up = tl.load(x_ptr + row * stride_x + K + cols, mask=inside, other=0.0).to(tl.float32)
            y = (gate / (1.0 + tl.exp(-gate)) * up).to(v.dtype).to(tl.float32)
        else:
            y = v.to(tl.float32)
        # The row's largest magnitude, then the row times its scale's reciprocal, rounded to nearest as torch's is,
        # so the result equals quantize_rows_torch of y.
        s = tl.maximum(tl.max(tl.abs(y), axis=0) * (1.0 / FP8_MAX), 1e-12)
        tl.store(s_ptr + row, s)
        q = tl.clamp(y * tl.math.div_rn(1.0, s), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty), mask=inside)

    return quantize_kernel


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, sx): each row of x as float8 e4m3 and its fp32 scale [rows, 1], x ~ x8 * sx (the reference of
    quantize_rows, and what HF reference models apply to their projections' inputs in tests)."""
    xf = x.float()
    # Multiplications by reciprocals, as the kernel does: torch divides by a Python number that way on CUDA, and a
    # multiply rounds the same in both.
    sx = (xf.abs().amax(dim=1, keepdim=True) * (1.0 / FP8_MAX)).clamp(min=1e-12)
    return (xf * sx.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), sx


def _quantize(mode: int, x: torch.Tensor, k: int, residual=None, weight=None, eps: float = 0.0):
    import triton

    block = triton.next_power_of_2(k)
    rows = x.shape[0]
    x8 = torch.empty((rows, k), dtype=FP8_DTYPE, device=x.device)
    sx = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    r = x if residual is None else residual
    _build_quantize_kernel()[(rows,)](
        x, r, x if weight is None else weight, x8, sx, k, x.stride(0), r.stride(0), eps,
        MODE=mode, HAS_RESIDUAL=residual is not None, BLOCK_K=block, FP8_MAX=FP8_MAX, num_warps=_row_warps(block),
    )  # fmt: skip
    return x8, sx


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_torch in one Triton kernel (the torch ops take five launches)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    return _quantize(PLAIN, x, x.shape[1])


def add_rmsnorm_quantize(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x8, sx, residual): RMSNorm(x + residual) quantized per token row in one kernel, the sum written into
    residual in place (with no residual, x itself is the residual): the norm before qkv and gate/up projections."""
    x8, sx = _quantize(ADD_RMSNORM, x, x.shape[1], residual, weight, eps)
    return x8, sx, x if residual is None else residual


def add_rmsnorm_quantize_torch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference of add_rmsnorm_quantize in torch ops (returns a new residual, changes nothing in place)."""
    r = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    v = r.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return *quantize_rows_torch(y), r


def silu_mul_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a8, sa): silu(gate) * up of a packed [rows, 2 * K] gate/up output, quantized per token row in one kernel:
    the SwiGLU before the down projection."""
    return _quantize(SILU_MUL, x, x.shape[1] // 2)


def silu_mul_quantize_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of silu_mul_quantize in torch ops."""
    gate, up = x.float().chunk(2, -1)
    return quantize_rows_torch((F.silu(gate) * up).to(x.dtype))


def fp8_scaled_mm(x8, sx, weight, scale, bias, out_dtype: torch.dtype, configs: dict | None = None) -> torch.Tensor:
    """(x8 * sx) @ (weight * scale)^T + bias for activations quantized per token row and an FP8 weight with row
    scales, written in out_dtype (bf16): up to MAX_ACT_ROWS rows on the few-row Triton kernel with configs[row tile]
    (tune_fp8_rows' choice; None there: cuBLASLt; no configs: the tile's default shape), else on cuBLASLt's FP8
    GEMM (`torch._scaled_mm`)."""
    rows = x8.shape[0]
    if rows <= MAX_ACT_ROWS:
        tile = rows_tile(rows)
        n, k = weight.shape
        cfg = _default_act_config(n, k, tile) if configs is None else configs.get(tile)
        if cfg is not None:
            # Promoted after every K step: at 1-64 rows not promoting was as often slower as faster (H200).
            return _launch_rows(x8, weight, cfg, bias=bias, scale=scale, x_scale=sx, out_dtype=out_dtype)[0]
    # The weight is [out, in] row-major, so its transpose is the column-major operand cuBLASLt's FP8 GEMM needs.
    y = torch._scaled_mm(
        x8, weight.t(), scale_a=sx, scale_b=scale[None, :], out_dtype=out_dtype, use_fast_accum=FAST_ACCUM
    )
    return y if bias is None else y.add_(bias)


def fp8_act_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, configs=None):
    """x @ (weight * scale)^T + bias with x quantized per token row to FP8 too (W8A8, as vLLM's "fp8" on Hopper):
    the FP8 GEMM (fp8_scaled_mm, with configs) reads one byte per weight and runs the tensor cores at twice the
    bf16 rate."""
    return fp8_scaled_mm(*quantize_rows(x), weight, scale, bias, x.dtype, configs)


def norm_fp8_linear(x: torch.Tensor, residual: torch.Tensor | None, norm, linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual) with FP8 activations, the add, norm and quantization in one
    kernel (add_rmsnorm_quantize): a launch and a pass over the normed activations fewer than norm then
    fp8_act_linear."""
    x8, sx, residual = add_rmsnorm_quantize(x, residual, norm.weight, norm.eps)
    y = fp8_scaled_mm(x8, sx, linear.weight, linear.weight_scale, linear.bias, x.dtype, linear.fp8_act_configs)
    return y, residual


def silu_fp8_linear(gate_up: torch.Tensor, linear) -> torch.Tensor:
    """linear(silu(gate) * up) with FP8 activations, the SwiGLU and quantization in one kernel."""
    a8, sa = silu_mul_quantize(gate_up)
    return fp8_scaled_mm(a8, sa, linear.weight, linear.weight_scale, linear.bias, gate_up.dtype, linear.fp8_act_configs)


def act_quant_supported(act_dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """Whether fp8_act_linear can take activations of act_dtype and this CUDA weight: bf16 (cuBLASLt's row-scaled
    FP8 GEMM writes bf16 only), dimensions divisible by 16, and a row within the quantizing kernel's registers."""
    n, k = weight.shape
    return act_dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0 and k <= 16384


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    configs: dict[int, tuple] | None = None,
    act_configs: dict[int, tuple | None] | None = None,
) -> torch.Tensor:
    """x @ (weight * scale)^T + bias for an FP8 weight: with ACT_MIN_ROWS or more token rows, FP8 activations
    (fp8_act_linear, with act_configs); else the Triton kernels up to MAX_FP8_ROWS token rows (with configs[row
    tile] when given, as tune_fp8_rows chose), else cuBLAS on the weight widened to x's dtype."""
    rows, k = x.shape
    if 0 < ACT_MIN_ROWS <= rows and x.is_cuda and act_quant_supported(x.dtype, weight):
        return fp8_act_linear(x, weight, scale, bias, act_configs)
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


@functools.cache
def _default_act_config(n: int, k: int, tile: int) -> tuple | None:
    # Steps without start-up timing (eager tools, tests): the row tile's first fitting shape, or cuBLASLt.
    configs = rows_configs_for(n, k, FP8_ACT_CONFIGS[tile])
    return configs[0] if configs else None


def _tune_act(lins) -> dict[int, tuple | None]:
    """Per row tile that steps with FP8 activations use, the fastest of the tile's FP8_ACT_CONFIGS or None
    (cuBLASLt's FP8 GEMM), timed at the tile's largest row count cycling through these projections."""
    from engine.layers.linear import warm_in_threads

    w0 = lins[0].weight
    calls = {}
    for tile, shapes in FP8_ACT_CONFIGS.items():
        if tile < ACT_MIN_ROWS:  # every step this tile serves has bf16 activations
            continue
        x8, sx = quantize_rows(torch.randn(tile, w0.shape[1], device=w0.device, dtype=torch.bfloat16))
        for cfg in [None, *rows_configs_for(w0.shape[0], w0.shape[1], shapes)]:
            calls[tile, cfg] = [
                functools.partial(fp8_scaled_mm, x8, sx, lin.weight, lin.weight_scale, lin.bias, torch.bfloat16,
                                  {tile: cfg})
                for lin in lins
            ]  # fmt: skip
    warm_in_threads([c[0] for c in calls.values()], w0.device)  # every tile's shapes compile side by side
    times: dict[int, dict[tuple | None, float]] = {}
    for (tile, cfg), us in time_candidates(calls).items():
        times.setdefault(tile, {})[cfg] = us
    return {tile: min(by_cfg, key=by_cfg.get) for tile, by_cfg in times.items()}


@torch.inference_mode()
def tune_fp8_rows(layers, stream_bytes: int) -> dict[str, dict[int, tuple]]:
    """Per FP8 projection role and row tile, the faster of FP8_ROWS_CONFIGS' pair for bf16 activations (row tiles
    whose every step takes FP8 activations, from ACT_MIN_ROWS rows, left out), and for FP8 activations the fastest
    of FP8_ACT_CONFIGS or cuBLASLt (_tune_act), timed over the layers' own weights (up to stream_bytes of them);
    each layer's Linear keeps its role's choices (`fp8_configs`, `fp8_act_configs`)."""
    start = time.perf_counter()
    plans: dict[str, dict[int, tuple]] = {}
    notes = []
    for role in ROLES:
        linears = [_role_modules(layer)[role][1] for layer in layers]
        w0 = linears[0].weight
        if w0.element_size() != 1:
            continue
        streamed = linears[: -(-stream_bytes // (w0.numel() + w0.shape[0] * 4))]  # as many as stream past L2
        mods = [(None, lin, None) for lin in streamed]
        plan = plans[role] = {}
        act_from = ACT_MIN_ROWS if ACT_MIN_ROWS and act_quant_supported(linears[0].act_dtype, w0) else None
        for tile, pair in FP8_ROWS_CONFIGS.items():
            first_row = 2 if tile == min(FP8_ROWS_CONFIGS) else tile // 2 + 1  # rows_tile's smallest row for it
            if act_from is not None and act_from <= first_row:
                continue
            fits = rows_configs_for(w0.shape[0], w0.shape[1], pair)
            if len(fits) == 1:
                plan[tile] = fits[0]
            elif fits:
                _, times = _time_role(mods, fits, tile)
                if times:
                    plan[tile] = min(times, key=times.get)
        act_plan = _tune_act(streamed) if act_from is not None else {}
        for lin in linears:
            lin.fp8_configs, lin.fp8_act_configs = plan, act_plan
        note = " ".join(f"{t}:{FP8_ROWS_CONFIGS[t].index(c) + 1}" for t, c in plan.items())
        act_note = " ".join(f"{t}:{FP8_ACT_CONFIGS[t].index(c) + 1 if c else 'Lt'}" for t, c in act_plan.items())
        notes.append(f"{role} {note or '-'} / {act_note or '-'}")
    if notes:
        elapsed = time.perf_counter() - start
        logger.info(
            "FP8 GEMMs (timed in %.1fs), per row tile the shape of FP8_ROWS_CONFIGS (bf16 activations) / "
            "FP8_ACT_CONFIGS or cuBLASLt (FP8 activations): %s",
            elapsed,
            "; ".join(notes),
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
        # The fused add + norm and SwiGLU kernels hold a whole row (the qkv and down projections' inputs).
        roles = [layer.get_submodule(path) for path in QUANTIZED_ROLES]
        layer.fp8_fusable = all(act_quant_supported(lin.act_dtype, lin.weight) for lin in roles)
    torch.cuda.empty_cache()
    logger.info("FP8 weights: the decoder layers' projections take %.2f GiB less", freed / 2**30)
    return freed
