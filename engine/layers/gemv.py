"""One-row GEMMs (batch-1 decode) as Triton GEMVs, with the residual add + RMSNorm before them and the SwiGLU after
them fused in.

Why: at one token per step every projection streams its weight once, and the norms and the activation between the
projections are tiny kernels whose cost is mostly launch latency inside a CUDA graph (~2-3 us each on an H100,
docs/benchmarks.md). Each program of the kernel recomputes the norm of the one hidden row (a few KB, from L2)
instead of waiting for a separate norm kernel, and the gate/up kernel multiplies silu(gate) by up before it stores,
which removes three launches per layer. cuBLAS is the fallback: `tune_gemv` times each role over the model's own
weights at start-up and keeps the Triton kernel only where it beats the unfused sequence it replaces.
NANOVLLM_GEMV=0 switches the path off; NANOVLLM_GEMV=force takes it for every role (tests and A/B runs).
Weights are written by no kernel, so under PDL each program loads weight tiles before it waits for the kernel
before (NANOVLLM_GEMV_PRELOAD, docs/benchmarks.md section 1): the one-row kernel as many of its K steps as fit
PRELOAD_BYTES_PER_THREAD (the whole slice of Qwen3-0.6B's projections), the few-row kernel its first K step.

Steps of 2..32 token rows (decode batches, short prefill chunks after a prefix-cache hit) get the same fusions from
a few-row kernel on tensor cores (`_build_rows_kernel`): the RMSNorm is folded into its epilogue (the GEMM takes
x * norm_weight and the rows are scaled by their rstd once the whole K is summed), and K is split so that
hundreds of programs stream one weight, the last split of each tile adding the partial sums in a fixed order.
`tune_rows` keeps it per role and row tile where it measures faster. Measured on an H100 (docs/benchmarks.md):
Qwen3-0.6B decode 1.07-1.18x at 2-16 requests. NANOVLLM_GEMV_MAX_ROWS=1 switches it off.

Steps of 2-4 rows may instead take the GEMV itself in a multi-row form (`_build_multi_kernel`): each weight tile,
loaded once, meets every row on the CUDA cores, with no padding to an MMA tile and no split-K round trip.
`tune_rows` times it beside the few-row kernel for those steps (plan tiles 2 and 4, `plan_tile`) and keeps the
faster per role. Measured on an H200 (docs/benchmarks.md, section 6): Qwen3-0.6B decode 1.11x / 1.07x / 1.05x at 2
/ 3 / 4 requests.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F

from engine.config import env_choice
from engine.layers.kernels import L2_PREFETCH_ASM, l2_prefetch_enabled, launch_options, triton_available
from engine.layers.linear import cycle_time_us, warm_in_threads

logger = logging.getLogger("engine")

# (rows per program, K per loop step, warps, weight loads marked evict-first). A GEMV is bound by how many weight
# bytes are in flight: few wide programs suit a long K, many narrow ones a short N (Qwen3-0.6B's down projection
# has only 1,024 rows). Evict-first keeps the streamed weight from displacing the hidden row every program rereads.
# These are the fastest per role of Qwen3-0.6B and Qwen3-8B in `gpu_profile.py rowgemv` (H100, docs/benchmarks.md).
GEMV_CONFIGS = (
    (1, 2048, 4, True),
    (2, 512, 2, True),
    (2, 1024, 4, False),
    (2, 1024, 4, True),
    (2, 2048, 8, True),
    (4, 512, 4, True),
    (4, 1024, 8, True),
    (4, 2048, 8, False),
    (8, 512, 4, True),
)
# More for FP8 weights (engine/layers/fp8.py): a byte of weight per element, so the same bytes in flight take twice
# the K per loop step or twice the rows.
FP8_GEMV_CONFIGS = (
    (4, 2048, 8, True),
    (8, 1024, 4, True),
    (8, 2048, 8, True),
    (16, 512, 4, True),
    (16, 1024, 8, True),
)
# Only for a K none of the above divides (SmolLM2's 576): short tiles cost more loop steps.
SMALL_K_CONFIGS = ((8, 64, 4, False), (16, 64, 4, False))
# More shapes for `gpu_profile.py rowgemv`, which measures what belongs in GEMV_CONFIGS.
SWEEP_CONFIGS = tuple(
    (bn, bk, w, e)
    for bn, bk, w in ((1, 1024, 2), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8))
    for e in (False, True)
)
# More one-row shapes for FP8 weights in `gpu_profile.py rowgemv --quantization fp8`: wider K steps and more rows
# per program, so that as many bytes are in flight per program as with a bf16 weight's tiles.
SWEEP_FP8_CONFIGS = (
    (2, 4096, 4, True), (4, 4096, 8, True), (8, 2048, 4, True), (8, 4096, 8, True), (16, 2048, 8, True),
    (32, 512, 4, True), (32, 1024, 8, True), (16, 1024, 4, True),
)  # fmt: skip
# Most weight bytes per thread the one-row kernel holds from before the PDL wait (64 registers): Qwen3-0.6B's o and
# down slices (2 rows of 2,048 and 3,072) whole in every configuration of 4+ warps, yet no spilling. Only for
# weights that fit a quarter of L2 (preload_steps).
PRELOAD_BYTES_PER_THREAD = 256
ROLES = ("qkv", "o", "gate_up", "down")
# Configurations per role, the fastest when timed alone, that are then timed in the captured decode step itself
# (engine/cuda_graphs.py: GraphRunner.refine_row_plan). Why: timed alone, several tie within 2%, yet in the step,
# where each kernel overlaps its neighbours (PDL, L2 prefetch), the choice moved batch-1 decode by up to ~5%
# (H100, docs/benchmarks.md).
STEP_TRIES = 3


def gemv_mode() -> str:
    """NANOVLLM_GEMV: "0" (off), "force" (Triton for every role) or "auto" (by start-up timing, the default)."""
    return env_choice("NANOVLLM_GEMV", "auto", ("0", "force", "auto"))


def gemv_max_rows() -> int:
    """NANOVLLM_GEMV_MAX_ROWS: the most token rows a step may have to take the few-row kernels (default MAX_ROWS;
    1 keeps them to one-row steps)."""
    value = os.environ.get("NANOVLLM_GEMV_MAX_ROWS", str(MAX_ROWS))
    if not value.isdigit() or not 1 <= int(value) <= MAX_ROWS:
        raise ValueError(f"NANOVLLM_GEMV_MAX_ROWS={value!r} must be a whole number from 1 to {MAX_ROWS}")
    return int(value)


def gemv_preload_mode() -> str:
    """NANOVLLM_GEMV_PRELOAD: which weights the GEMV kernels load before they wait for the kernel before under PDL
    (and before the norm): "all" (the default: the one-row kernel as many K steps as fit PRELOAD_BYTES_PER_THREAD,
    the few-row kernel its first), "1" (the first K step of each) or "0" (none: only an L2 prefetch)."""
    return env_choice("NANOVLLM_GEMV_PRELOAD", "all", ("0", "1", "all"))


def gemv_preload_enabled() -> bool:
    """Whether the GEMV kernels load any weights before the PDL wait (NANOVLLM_GEMV_PRELOAD is not "0")."""
    return gemv_preload_mode() != "0"


def preload_steps(block_n: int, block_k: int, warps: int, k: int, element_size: int, silu: bool, small: bool) -> int:
    """How many K steps of its weight slice the one-row kernel loads before the PDL wait (0: none); small: the
    weight fits a quarter of L2, as Qwen3-0.6B's do."""
    mode = gemv_preload_mode()
    if mode != "all":
        return int(mode)
    if not small:
        # A large weight's GEMV streams for tens of µs: the registers held from the start cost it resident
        # programs, and Qwen3-8B decoded 0.973x with its slices preloaded (H200, docs/benchmarks.md).
        return 1
    steps = max(1, k // block_k)
    # The preloaded steps are one [rows, steps, K step] tile whose step axis is padded to a power of two.
    per_thread = block_n * block_k * element_size * (2 if silu else 1) / (warps * 32)
    while steps > 1 and per_thread * (1 << (steps - 1).bit_length()) > PRELOAD_BYTES_PER_THREAD:
        steps -= 1
    return steps


def gemv_supported(weight: torch.Tensor) -> bool:
    """Whether the Triton GEMV can run on this weight: Triton importable, a CUDA bf16/fp16 (or FP8) weight."""
    if not triton_available():
        return False
    return weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def gemv_configs(weight: torch.Tensor) -> tuple[tuple[int, int, int, bool], ...]:
    """The one-row configurations the start-up timing tries for this weight (more for FP8 weights)."""
    return GEMV_CONFIGS + (FP8_GEMV_CONFIGS if weight.element_size() == 1 else ())


def configs_for(n: int, k: int, configs=GEMV_CONFIGS) -> list[tuple[int, int, int, bool]]:
    """The configurations whose tiles divide an [n, k] weight (the kernel has no edge masks)."""
    fits = [c for c in configs if n % c[0] == 0 and k % c[1] == 0]
    return fits or [c for c in SMALL_K_CONFIGS if n % c[0] == 0 and k % c[1] == 0]


@functools.cache
def _build_pdl_prologue():
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_then_wait(w_ptrs, up_offset, nbytes, ASM: tl.constexpr, SILU: tl.constexpr, PREFETCH: tl.constexpr):
        # The weights are not written by earlier kernels: pull this program's part (and with SILU the matching
        # "up" part, up_offset further) into L2 while the kernel before is still finishing; then let the next
        # kernel launch, and wait for the earlier kernels' outputs (hidden rows, residual) before reading them.
        if PREFETCH:
            tl.inline_asm_elementwise(ASM, "=r,l,r", [w_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
            if SILU:
                tl.inline_asm_elementwise(
                    ASM, "=r,l,r", [w_ptrs + up_offset, nbytes], dtype=tl.int32, is_pure=False, pack=1
                )
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()

    return prefetch_then_wait


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    prefetch_asm = tl.constexpr(L2_PREFETCH_ASM)
    pdl_prologue = _build_pdl_prologue()
    _build_helpers()

    @triton.jit
    def gemv_kernel(
        x_ptr,
        res_ptr,
        norm_w_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        y_ptr,
        res_out_ptr,
        N,
        K,
        stride_w,
        slice_bytes,
        eps,
        NORM: tl.constexpr,
        RESIDUAL: tl.constexpr,
        SILU: tl.constexpr,
        BIAS: tl.constexpr,
        SCALE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVICT_FIRST: tl.constexpr,
        PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
        PRELOAD: tl.constexpr,
        STEPS_P2: tl.constexpr,
    ):
        # Program `pid` computes outputs rows [pid * BLOCK_N, +BLOCK_N); with SILU also the matching "up" rows,
        # N rows further down the packed gate/up weight.
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
        if PRELOAD == 1:
            # The first K step's weights into registers before the PDL wait (no earlier kernel writes a weight):
            # they arrive while the kernel before finishes, and after the wait only the hidden row is read.
            w_first = gemv_load_w(w_rows, EVICT_FIRST)
            w_first_up = w_first
            if SILU:
                w_first_up = gemv_load_w(w_rows + N * stride_w, EVICT_FIRST)
        if PRELOAD > 1:
            # The first PRELOAD K steps as one [rows, steps, K step] tile, its steps padded to STEPS_P2: a padded
            # step repeats the last real one's columns (its loads stay inside the row) and its weights are zeros.
            step = tl.arange(0, STEPS_P2)
            pre_cols = tl.minimum(step, PRELOAD - 1)[:, None] * BLOCK_K + cols[None, :]
            real = (step < PRELOAD)[None, :, None]
            w_pre_rows = w_ptr + rows.to(tl.int64)[:, None, None] * stride_w + pre_cols[None, :, :]
            if STEPS_P2 == PRELOAD:  # no padded step: no mask
                w_pre = gemv_load_w(w_pre_rows, EVICT_FIRST)
            else:
                w_pre = gemv_load_w_masked(w_pre_rows, real, EVICT_FIRST)
            w_pre_up = w_pre
            if SILU:
                if STEPS_P2 == PRELOAD:
                    w_pre_up = gemv_load_w(w_pre_rows + N * stride_w, EVICT_FIRST)
                else:
                    w_pre_up = gemv_load_w_masked(w_pre_rows + N * stride_w, real, EVICT_FIRST)
        if PDL:  # this program's rows are one contiguous slice of the weight: one thread prefetches it
            w_slice = w_ptr + pid.to(tl.int64) * BLOCK_N * stride_w
            pdl_prologue(w_slice, N * stride_w, slice_bytes, prefetch_asm, SILU, PREFETCH)
        dtype = y_ptr.dtype.element_ty
        rstd = 1.0
        if NORM:
            # Pass 1 over the hidden row: its mean square. The sum is rounded to the activation dtype first, as
            # the unfused path stores it.
            sq = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                h = tl.load(x_ptr + k0 + cols).to(tl.float32)
                if RESIDUAL:
                    h = (h + tl.load(res_ptr + k0 + cols).to(tl.float32)).to(dtype).to(tl.float32)
                sq += h * h
            rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        start = 0
        if PRELOAD == 1:
            xv = gemv_one_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 0, cols, rstd, pid, NORM, RESIDUAL, dtype)
            acc += w_first.to(tl.float32) * xv[None, :]
            if SILU:
                acc_up += w_first_up.to(tl.float32) * xv[None, :]
            start = BLOCK_K
        if PRELOAD > 1:
            # A padded step reads the last real step's activations again (and program 0 rewrites the same residual
            # values): times its zero weights, it adds nothing.
            # (Named apart from the loop's xv: Triton's compiler takes a name set before a loop as carried by it.)
            x_pre = gemv_one_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 0, pre_cols, rstd, pid, NORM, RESIDUAL,
                                   dtype)  # fmt: skip
            # Reduced to one sum per row here (added after the loop): no [rows, K step] tile changes layout.
            y_pre = tl.sum(tl.sum(w_pre.to(tl.float32) * x_pre[None, :, :], axis=2), axis=1)
            up_pre = y_pre
            if SILU:
                up_pre = tl.sum(tl.sum(w_pre_up.to(tl.float32) * x_pre[None, :, :], axis=2), axis=1)
            start = PRELOAD * BLOCK_K
        for k0 in range(start, K, BLOCK_K):
            xv = gemv_one_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, k0, cols, rstd, pid, NORM, RESIDUAL, dtype)
            acc += gemv_load_w(w_rows + k0, EVICT_FIRST).to(tl.float32) * xv[None, :]
            if SILU:
                acc_up += gemv_load_w(w_rows + N * stride_w + k0, EVICT_FIRST).to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
        up = y
        if SILU:
            up = tl.sum(acc_up, axis=1)
        if PRELOAD > 1:
            y += y_pre
            if SILU:
                up += up_pre
        y = gemv_finish(y, up, rows, N, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)
        tl.store(y_ptr + rows, y.to(dtype))

    return gemv_kernel


# The GEMV kernels' Triton helpers, set by _build_helpers: the shared epilogue, the weight tile load, the one-row
# and few-row kernels' K steps, and the multi-row kernel's per-row norm, input and store.
gemv_finish = gemv_row_rstd = gemv_row_input = gemv_store_row = None
gemv_load_w = gemv_load_w_masked = gemv_one_input = gemv_rows_step = None


@functools.cache
def _build_helpers():
    import triton
    import triton.language as tl

    @triton.jit
    def finish(y, up, rows, N, scale_ptr, bias_ptr, dtype: tl.constexpr, SILU: tl.constexpr, BIAS: tl.constexpr,
               SCALE: tl.constexpr):  # fmt: skip
        # The GEMVs' epilogue for fp32 sums y (and up, with SILU) of the output rows `rows` (their last axis).
        if SCALE:  # FP8 weights: one scale per output row (engine/layers/fp8.py)
            y *= tl.load(scale_ptr + rows)
        if BIAS:
            y += tl.load(bias_ptr + rows).to(tl.float32)
        if SILU:
            # As the unfused path: gate and up stored in the activation dtype, silu(gate) * up computed in fp32.
            gate = y.to(dtype).to(tl.float32)
            if SCALE:
                up *= tl.load(scale_ptr + N + rows)
            if BIAS:  # the packed bias's "up" half, N further on
                up += tl.load(bias_ptr + N + rows).to(tl.float32)
            up = up.to(dtype).to(tl.float32)
            y = gate * tl.sigmoid(gate) * up
        return y

    # Module globals, not closures: Triton's interpreter (the CPU tests) resolves a kernel's names in its module.
    globals()["gemv_finish"] = finish

    @triton.jit
    def load_w(ptrs, EVICT_FIRST: tl.constexpr):
        # A weight tile; evict-first keeps the streamed weight from displacing what programs reread (GEMV_CONFIGS).
        if EVICT_FIRST:
            return tl.load(ptrs, eviction_policy="evict_first")
        return tl.load(ptrs)

    @triton.jit
    def load_w_masked(ptrs, mask, EVICT_FIRST: tl.constexpr):
        # As load_w, zeros where mask is false (no memory request there).
        if EVICT_FIRST:
            return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def one_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, k0, cols, rstd, pid, NORM: tl.constexpr,
                  RESIDUAL: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
        # The one-row GEMV's activations at K offset k0: plain, or residual-added (written back by program 0, the
        # others only read the old residual) and normed.
        xv = tl.load(x_ptr + k0 + cols).to(tl.float32)
        if NORM:
            if RESIDUAL:
                xv = (xv + tl.load(res_ptr + k0 + cols).to(tl.float32)).to(dtype).to(tl.float32)
                if pid == 0:
                    tl.store(res_out_ptr + k0 + cols, xv.to(dtype))
            nw = tl.load(norm_w_ptr + k0 + cols).to(tl.float32)
            xv = (xv * rstd * nw).to(dtype).to(tl.float32)
        return xv

    @triton.jit
    def gemv_row_rstd(x_ptr, res_ptr, row, M, K, cols, eps, RESIDUAL: tl.constexpr, dtype: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
        # 1/rms of token row `row` (after the residual add, rounded to the activation dtype as the unfused path
        # stores it); a padded row (row >= M) reads zeros.
        live = cols * 0 + row < M
        sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            h = tl.load(x_ptr + row * K + k0 + cols, mask=live, other=0.0).to(tl.float32)
            if RESIDUAL:
                r = tl.load(res_ptr + row * K + k0 + cols, mask=live, other=0.0)
                h = (h + r.to(tl.float32)).to(dtype).to(tl.float32)
            sq += h * h
        return tl.rsqrt(tl.sum(sq, axis=0) / K + eps)

    @triton.jit
    def gemv_row_input(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, row, M, K, k0, cols, rstd, write,
                       NORM: tl.constexpr, RESIDUAL: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
        # Token row `row`'s activations at K offset k0, as the GEMM takes them: plain, or residual-added (written
        # back by one program) and normed.
        live = cols * 0 + row < M
        xv = tl.load(x_ptr + row * K + k0 + cols, mask=live, other=0.0).to(tl.float32)
        if NORM:
            if RESIDUAL:
                r = tl.load(res_ptr + row * K + k0 + cols, mask=live, other=0.0)
                xv = (xv + r.to(tl.float32)).to(dtype).to(tl.float32)
                if write:
                    tl.store(res_out_ptr + row * K + k0 + cols, xv.to(dtype), mask=live)
            nw = tl.load(norm_w_ptr + k0 + cols).to(tl.float32)
            xv = (xv * rstd * nw).to(dtype).to(tl.float32)
        return xv

    @triton.jit
    def rows_step(w_tile, w_first, w_first_up, FIRST: tl.constexpr, k0, acc, acc_up, sq, x_ptr, res_ptr, norm_w_ptr,
                  res_out_ptr, offs, live, cols, pid, N, stride_wn, stride_wk, dtype: tl.constexpr,
                  NORM: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr, X8: tl.constexpr,
                  IMPRECISE: tl.constexpr):  # fmt: skip
        # The few-row kernel's K step at k0: its token rows' activations (residual-added and normed: the sum of
        # squares in sq), times the weight tile; FIRST: the tile (and the "up" tile) already loaded.
        xv = tl.load(x_ptr + offs + k0, mask=live[:, None], other=0.0)
        if NORM:
            h = xv.to(tl.float32)
            if RESIDUAL:
                # The sum is rounded to the activation dtype, as the unfused path stores it.
                r = tl.load(res_ptr + offs + k0, mask=live[:, None], other=0.0)
                h = (h + r.to(tl.float32)).to(dtype)
                if pid == 0:  # one program per K range writes the new residual; the others only read
                    tl.store(res_out_ptr + offs + k0, h, mask=live[:, None])
                h = h.to(tl.float32)
            sq += tl.sum(h * h, axis=1)
            xv = (h * tl.load(norm_w_ptr + k0 + cols).to(tl.float32)[None, :]).to(dtype)
        if FIRST:
            w = w_first
        else:
            w = tl.load(w_tile + k0 * stride_wk)
        if X8:
            # FP8 activations (x8, one scale per token row, engine/layers/fp8.py) and FP8 weights meet on the
            # tensor cores as they are; the partial sums are promoted to fp32 after every K step unless IMPRECISE
            # (as cuBLASLt's use_fast_accum).
            acc = tl.dot(w, tl.trans(xv), acc, max_num_imprecise_acc=IMPRECISE)
        else:
            # FP8 weights are widened to the activation dtype for the MMA (a no-op for bf16/fp16 weights).
            acc = tl.dot(w.to(dtype), tl.trans(xv), acc)
        if SILU:
            if FIRST:
                w_up = w_first_up
            else:
                w_up = tl.load(w_tile + N * stride_wn + k0 * stride_wk)
            acc_up = tl.dot(w_up.to(dtype), tl.trans(xv), acc_up)
        return acc, acc_up, sq

    @triton.jit
    def gemv_store_row(acc, acc_up, row, M, rows, N, y_ptr, scale_ptr, bias_ptr, dtype: tl.constexpr,
                       SILU: tl.constexpr, BIAS: tl.constexpr, SCALE: tl.constexpr):  # fmt: skip
        # Row `row`'s outputs through the shared epilogue; a padded row is not stored.
        y = tl.sum(acc, axis=1)
        up = y
        if SILU:
            up = tl.sum(acc_up, axis=1)
        y = gemv_finish(y, up, rows, N, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)
        tl.store(y_ptr + row * N + rows, y.to(dtype), mask=rows * 0 + row < M)

    globals().update(gemv_row_rstd=gemv_row_rstd, gemv_row_input=gemv_row_input, gemv_store_row=gemv_store_row,
                     gemv_load_w=load_w, gemv_load_w_masked=load_w_masked, gemv_one_input=one_input,
                     gemv_rows_step=rows_step)  # fmt: skip


@functools.cache
def _build_multi_kernel():
    import triton
    import triton.language as tl

    prefetch_asm = tl.constexpr(L2_PREFETCH_ASM)
    pdl_prologue = _build_pdl_prologue()
    _build_helpers()

    @triton.jit
    def gemv_multi_kernel(
        x_ptr,
        res_ptr,
        norm_w_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        y_ptr,
        res_out_ptr,
        N,
        K,
        stride_w,
        slice_bytes,
        eps,
        M,
        NORM: tl.constexpr,
        RESIDUAL: tl.constexpr,
        SILU: tl.constexpr,
        BIAS: tl.constexpr,
        SCALE: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVICT_FIRST: tl.constexpr,
        PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        # The one-row GEMV for M <= ROWS (2 or 4) token rows on the CUDA cores: each weight tile, loaded once in
        # the one-row kernel's layout, meets every row (one accumulator per row), so a step of 2-4 rows streams
        # its weights about as fast as one row does; the few-row kernel pads them to a 16-row MMA tile and splits
        # K, with a round trip of partial sums. Rows past M read zeros and are not stored.
        pid = tl.program_id(0)
        if PDL:
            w_slice = w_ptr + pid.to(tl.int64) * BLOCK_N * stride_w
            pdl_prologue(w_slice, N * stride_w, slice_bytes, prefetch_asm, SILU, PREFETCH)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        dtype = y_ptr.dtype.element_ty
        r0, r1, r2, r3 = 1.0, 1.0, 1.0, 1.0
        if NORM:
            r0 = gemv_row_rstd(x_ptr, res_ptr, 0, M, K, cols, eps, RESIDUAL, dtype, BLOCK_K)
            r1 = gemv_row_rstd(x_ptr, res_ptr, 1, M, K, cols, eps, RESIDUAL, dtype, BLOCK_K)
            if ROWS > 2:
                r2 = gemv_row_rstd(x_ptr, res_ptr, 2, M, K, cols, eps, RESIDUAL, dtype, BLOCK_K)
                r3 = gemv_row_rstd(x_ptr, res_ptr, 3, M, K, cols, eps, RESIDUAL, dtype, BLOCK_K)
        w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w + cols[None, :]
        a0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        a1, a2, a3, u0, u1, u2, u3 = a0, a0, a0, a0, a0, a0, a0
        first = pid == 0  # one program writes the new residual; the others only read the old one
        for k0 in range(0, K, BLOCK_K):
            w = gemv_load_w(w_rows + k0, EVICT_FIRST).to(tl.float32)
            w_up = w
            if SILU:
                w_up = gemv_load_w(w_rows + N * stride_w + k0, EVICT_FIRST).to(tl.float32)
            x = gemv_row_input(
                x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 0, M, K, k0, cols, r0, first, NORM, RESIDUAL, dtype
            )
            a0 += w * x[None, :]
            if SILU:
                u0 += w_up * x[None, :]
            x = gemv_row_input(
                x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 1, M, K, k0, cols, r1, first, NORM, RESIDUAL, dtype
            )
            a1 += w * x[None, :]
            if SILU:
                u1 += w_up * x[None, :]
            if ROWS > 2:
                x = gemv_row_input(
                    x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 2, M, K, k0, cols, r2, first, NORM, RESIDUAL, dtype
                )
                a2 += w * x[None, :]
                if SILU:
                    u2 += w_up * x[None, :]
                x = gemv_row_input(
                    x_ptr, res_ptr, norm_w_ptr, res_out_ptr, 3, M, K, k0, cols, r3, first, NORM, RESIDUAL, dtype
                )
                a3 += w * x[None, :]
                if SILU:
                    u3 += w_up * x[None, :]
        gemv_store_row(a0, u0, 0, M, rows, N, y_ptr, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)
        gemv_store_row(a1, u1, 1, M, rows, N, y_ptr, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)
        if ROWS > 2:
            gemv_store_row(a2, u2, 2, M, rows, N, y_ptr, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)
            gemv_store_row(a3, u3, 3, M, rows, N, y_ptr, scale_ptr, bias_ptr, dtype, SILU, BIAS, SCALE)

    return gemv_multi_kernel


# Few-row GEMMs (2..MAX_ROWS rows: decode batches, small prefill steps): (output rows per program, K step, warps,
# pipeline stages, K splits). Each program covers a short K range in one or two steps, so a layer's weight is
# requested at once by hundreds of programs; the last split of each tile to finish adds the partial sums up.
MAX_ROWS = 32
# Steps of 2..MULTI_MAX_ROWS rows may instead take the one-row GEMV in its multi-row form (gemv_multi_kernel), on
# row-major weights: CUDA cores have the few rows' multiply-adds to spare while the weight streams.
MULTI_MAX_ROWS = 4
# Its shapes per plan tile (2 rows; 3-4 rows): each was the fastest for a role of Qwen3-0.6B or Qwen3-8B in one of
# the `gpu_profile.py fewrows --few-rows 2 4` sweeps (H200, s38run1 and s38run3, docs/benchmarks.md).
# At 2 rows qkv and gate/up take 8-16 rows per program with K steps of 256 (0.69-0.73 of the unfused time, where the
# one-row kernel's shapes gave 0.91); at 4 rows only o and down ever took this kernel, with 2-4 rows per program.
# Few, as each compiles for every role on a first start: with 8 shapes at both tiles, a cold start's few-row timing
# took 2.7 s more than without this kernel (s38run5); these lists took 3.7 s against 4.6 (s38run6).
MULTI_CONFIGS = {
    2: ((1, 1024, 4, True), (2, 1024, 4, False), (8, 256, 4, False), (8, 512, 4, True), (16, 256, 4, False)),
    4: ((2, 1024, 4, False), (2, 1024, 4, True), (4, 1024, 4, False)),
}
# More for `gpu_profile.py fewrows` at 2-4 rows: smaller tiles per thread (4-8 weights), as each token row keeps its
# own accumulator of the tile's shape in registers (8 for gate/up at 4 rows). They did not make qkv or gate/up at 4
# rows faster than the few-row kernel (s38run1: 1.02-1.44x the unfused time at best, against 0.84-0.94).
SWEEP_MULTI_CONFIGS = tuple(
    (bn, bk, w, True)
    for bn, bk, w in ((1, 1024, 4), (2, 512, 4), (4, 256, 4), (2, 1024, 8), (4, 512, 8), (8, 256, 8), (1, 512, 2),
                      (2, 256, 2), (1, 1024, 8), (2, 512, 8))
)  # fmt: skip
MAX_TILES = 4096  # output tiles of one launch at most: the split-K arrival counters
# The fastest per role of Qwen3-0.6B at 4, 16 and 32 rows in `gpu_profile.py fewrows` (H100, docs/benchmarks.md).
ROWS_CONFIGS = (
    (64, 256, 4, 1, 4),
    (64, 256, 4, 2, 4),
    (64, 128, 4, 2, 8),
    (128, 256, 8, 1, 4),
)
# More shapes for `gpu_profile.py fewrows`, which measures what belongs in ROWS_CONFIGS.
SWEEP_ROWS_CONFIGS = tuple(
    (bn, bk, w, st, sk)
    for bn, bk, w, st, sk in (
        (32, 128, 4, 1, 8), (64, 512, 4, 1, 2), (64, 128, 4, 1, 8), (32, 256, 4, 2, 8), (16, 256, 4, 2, 8),
        (32, 256, 4, 2, 12), (64, 256, 8, 2, 4), (128, 128, 4, 1, 8), (64, 128, 8, 1, 4), (64, 128, 4, 2, 4),
        (64, 256, 4, 2, 2), (64, 256, 4, 1, 2), (128, 128, 8, 2, 8),
        # No split-K: each program streams its rows' whole K through a pipeline, with no partial-sum round trip.
        (32, 256, 4, 3, 1), (32, 128, 4, 4, 1), (16, 256, 4, 3, 1), (16, 128, 4, 4, 1), (32, 256, 8, 3, 1),
        (64, 128, 4, 4, 1), (32, 512, 8, 2, 1),
    )
)  # fmt: skip
# More few-row shapes for FP8 weights in `gpu_profile.py fewrows --quantization fp8`: a byte per weight element, so
# wider K steps (or more rows per program) keep a bf16 tile's bytes in flight.
SWEEP_FP8_ROWS_CONFIGS = (
    (64, 512, 4, 2, 4), (64, 512, 4, 1, 8), (128, 512, 8, 2, 4), (128, 256, 8, 2, 4), (64, 256, 4, 3, 4),
    (128, 256, 4, 2, 8), (64, 1024, 8, 1, 4), (32, 512, 4, 2, 8), (256, 256, 8, 2, 4), (128, 512, 8, 1, 8),
    (64, 512, 4, 2, 2), (128, 512, 8, 2, 2),
)  # fmt: skip
# FP8 weights (engine/layers/fp8.py): per row tile (rows_tile: 16, 32, 64, 128, 256), the two few-row configurations
# start-up timing chooses between per projection (fp8.tune_fp8_rows); the first is the default.
# From `gpu_profile.py fewrows --quantization fp8 --plain` over Qwen3-0.6B and Qwen3-8B (H200, docs/benchmarks.md):
# over the eight projections the better of each pair is on average 0-11% (at worst 33%) slower than the fastest of
# the 9-20 shapes swept, where the first alone is up to 1.63x slower (gate/up at 64+ rows).
FP8_ROWS_CONFIGS = {
    16: ((64, 256, 4, 2, 4), (64, 128, 4, 2, 8)),
    32: ((64, 256, 4, 2, 4), (64, 256, 4, 3, 4)),
    64: ((64, 128, 8, 2, 4), (64, 128, 4, 2, 2)),
    128: ((64, 128, 8, 2, 4), (64, 64, 4, 3, 2)),
    256: ((64, 128, 8, 3, 2), (64, 64, 4, 3, 2)),
}
# Shapes for tiles of 64-256 token rows (decode batches of the throughput and shared-prefix workloads, where cuBLAS
# runs o and down at 0.7-1.0 TB/s), for `gpu_profile.py fewrows --few-rows 64 256`. Not used by the engine: on an
# H100 every role was 1.26-10x slower than the unfused cuBLAS path at 64 and 256 rows (docs/benchmarks.md). The
# accumulator is [rows/program, token rows] in registers, so wide tiles take fewer rows per program.
SWEEP_WIDE_ROWS_CONFIGS = (
    (64, 64, 4, 3, 1), (64, 128, 8, 2, 1), (64, 64, 8, 4, 1), (32, 128, 4, 2, 1), (32, 64, 4, 4, 1),
    (128, 64, 8, 3, 1), (64, 128, 4, 2, 2), (32, 128, 4, 2, 2), (64, 64, 4, 3, 2), (64, 128, 8, 2, 4),
    (32, 64, 4, 3, 4), (16, 128, 4, 3, 1), (32, 128, 8, 3, 4),
)  # fmt: skip
# The same for FP8 weights, whose alternative at 33+ rows is widening the weight for cuBLAS (engine/layers/fp8.py).
SWEEP_FP8_WIDE_ROWS_CONFIGS = (
    (128, 128, 8, 3, 1), (128, 64, 8, 4, 1), (64, 256, 8, 2, 1), (128, 128, 8, 2, 2), (64, 128, 8, 3, 2),
    (256, 64, 8, 3, 1), (128, 256, 8, 2, 1),
)  # fmt: skip
# Each of a program's threads asks for one weight row's K range (sm90 bulk L2 prefetch); a row may be asked for
# by more than one thread, which costs nothing.
L2_PREFETCH_ROWS_ASM = "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;"


def plan_tile(m: int) -> int:
    """The rows_plan key for a step of m (2..MAX_ROWS) token rows: 2 or 4 (next power of two) up to
    MULTI_MAX_ROWS, whose steps may take the multi-row GEMV, else rows_tile(m)."""
    return 1 << (m - 1).bit_length() if m <= MULTI_MAX_ROWS else rows_tile(m)


def rows_tile(m: int) -> int:
    """The padded token-row tile for m rows: 16, or the next power of two (32 up to MAX_ROWS; wider tiles only in
    `gpu_profile.py fewrows`, which measures whether they would pay)."""
    return 16 if m <= 16 else 1 << (m - 1).bit_length()


@functools.cache
def _build_rows_kernel():
    import triton
    import triton.language as tl

    prefetch_asm = tl.constexpr(L2_PREFETCH_ROWS_ASM)
    pdl_prologue = _build_pdl_prologue()
    _build_helpers()

    @triton.jit
    def rows_kernel(
        x_ptr,
        res_ptr,
        norm_w_ptr,
        w_ptr,
        bias_ptr,
        scale_ptr,
        xs_ptr,
        y_ptr,
        res_out_ptr,
        part_ptr,
        counter_ptr,
        M,
        N,
        K,
        stride_wn,
        stride_wk,
        eps,
        NORM: tl.constexpr,
        RESIDUAL: tl.constexpr,
        SILU: tl.constexpr,
        BIAS: tl.constexpr,
        SCALE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        STAGES: tl.constexpr,
        PDL: tl.constexpr,
        PREFETCH: tl.constexpr,
        W_BYTES: tl.constexpr,
        X8: tl.constexpr,
        IMPRECISE: tl.constexpr,
        PRELOAD: tl.constexpr,
    ):
        # Program (pid, split) computes acc[n, m] = W[n, k] x[m, k]^T over its K range for the output rows
        # pid * BLOCK_N.. (the weight fills the MMA's long side, the few token rows its short one). RMSNorm is
        # applied without a pass of its own: the GEMM takes x * norm_weight, each program also sums x^2 over its K
        # range, and the token rows are scaled by their rstd once the whole K is summed.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        k_len = tl.multiple_of(K // SPLIT_K, BLOCK_K)  # rows_configs_for offers only splits that BLOCK_K divides
        k_first = tl.multiple_of(split * k_len, BLOCK_K)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        w_tile = w_ptr + n.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk
        if PRELOAD:  # the first K step's weights, before the wait (no earlier kernel writes a weight)
            w_first = tl.load(w_tile + k_first * stride_wk)
            w_first_up = w_first
            if SILU:
                w_first_up = tl.load(w_tile + N * stride_wn + k_first * stride_wk)
        if PDL:  # each weight row's K range of this program is prefetched on its own (row-major weights)
            w_rows = w_ptr + n.to(tl.int64) * stride_wn + k_first
            pdl_prologue(w_rows, N * stride_wn, k_len * W_BYTES, prefetch_asm, SILU, PREFETCH)
        dtype = y_ptr.dtype.element_ty
        m = tl.arange(0, BLOCK_M)
        live = m < M
        offs = m[:, None] * K + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        start = k_first
        if PRELOAD:  # the first K step with the weights loaded before the wait
            acc, acc_up, sq = gemv_rows_step(
                w_tile, w_first, w_first_up, True, k_first, acc, acc_up, sq, x_ptr, res_ptr, norm_w_ptr, res_out_ptr,
                offs, live, cols, pid, N, stride_wn, stride_wk, dtype, NORM, RESIDUAL, SILU, X8, IMPRECISE,
            )  # fmt: skip
            start = k_first + BLOCK_K
        for k0 in tl.range(start, k_first + k_len, BLOCK_K, num_stages=STAGES):
            acc, acc_up, sq = gemv_rows_step(
                w_tile, acc, acc, False, k0, acc, acc_up, sq, x_ptr, res_ptr, norm_w_ptr, res_out_ptr,
                offs, live, cols, pid, N, stride_wn, stride_wk, dtype, NORM, RESIDUAL, SILU, X8, IMPRECISE,
            )  # fmt: skip
        last = True
        if SPLIT_K > 1:
            # Each split stores its partial sums (and its rows' partial x^2); the last of the tile's splits to
            # arrive adds them up and finishes the tile.
            tile = n[:, None] * BLOCK_M + m[None, :]
            up_base = part_ptr + SPLIT_K * N * BLOCK_M
            sq_base = part_ptr + (2 if SILU else 1) * SPLIT_K * N * BLOCK_M + pid * SPLIT_K * BLOCK_M
            tl.store(part_ptr + split * N * BLOCK_M + tile, acc)
            if SILU:
                tl.store(up_base + split * N * BLOCK_M + tile, acc_up)
            if NORM:
                tl.store(sq_base + split * BLOCK_M + m, sq)
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel")
            last = arrived == SPLIT_K - 1
            if last:
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                sq = tl.zeros([BLOCK_M], dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(part_ptr + s * N * BLOCK_M + tile, cache_modifier=".cg")
                    if SILU:
                        acc_up += tl.load(up_base + s * N * BLOCK_M + tile, cache_modifier=".cg")
                    if NORM:
                        sq += tl.load(sq_base + s * BLOCK_M + m, cache_modifier=".cg")
                tl.store(counter_ptr + pid, 0)  # ready for the next launch
        if last:
            if X8:
                acc = acc * tl.load(xs_ptr + m, mask=live, other=0.0)[None, :]
            if SCALE:
                acc = acc * tl.load(scale_ptr + n)[:, None]
                if SILU:
                    acc_up = acc_up * tl.load(scale_ptr + N + n)[:, None]
            if NORM:
                rstd = tl.rsqrt(sq / K + eps)
                acc = acc * rstd[None, :]
                acc_up = acc_up * rstd[None, :]
            if BIAS:
                acc += tl.load(bias_ptr + n).to(tl.float32)[:, None]
                if SILU:  # the packed bias's "up" half, N further on
                    acc_up += tl.load(bias_ptr + N + n).to(tl.float32)[:, None]
            if SILU:
                # As the unfused path: gate and up stored in the activation dtype, silu(gate) * up in fp32.
                gate = acc.to(dtype).to(tl.float32)
                up = acc_up.to(dtype).to(tl.float32)
                acc = gate * tl.sigmoid(gate) * up
            tl.store(y_ptr + m[None, :] * N + n[:, None], acc.to(dtype), mask=live[None, :])

    return rows_kernel


@functools.cache
def _split_counters(device: torch.device) -> torch.Tensor:
    # Arrival counters of split-K tiles, zero between launches (the last arrival resets its own); kernels that
    # share them run one after another (a PDL launch touches them only after its wait).
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


def rows_configs_for(n: int, k: int, configs=ROWS_CONFIGS) -> list[tuple[int, int, int, int, int]]:
    """The few-row configurations whose tiles divide an [n, k] weight, with at most MAX_TILES output tiles (the
    arrival counters)."""
    return [c for c in configs if n % c[0] == 0 and k % (c[1] * c[4]) == 0 and n // c[0] <= MAX_TILES]


# Few-row launches (configuration, dtypes, fusions, row tile) whose preloaded first K step does not fit in shared
# memory: they run without it.
_NO_PRELOAD: set[tuple] = set()


def _launch_rows(
    x, weight, cfg, bias=None, norm=None, residual=None, silu=False, scale=None, x_scale=None, out_dtype=None,
    imprecise=False,
):  # fmt: skip
    # x_scale: x is FP8 with one scale per row ([rows, 1] fp32, engine/layers/fp8.py), y is written in out_dtype.
    block_n, block_k, warps, stages, split_k = cfg
    m, k = x.shape
    n = weight.shape[0] // 2 if silu else weight.shape[0]
    x = x.contiguous()
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else y
    tile_m = rows_tile(m)
    part_len = ((2 if silu else 1) * n + n // block_n) * split_k * tile_m if split_k > 1 else 1
    part = torch.empty(part_len, dtype=torch.float32, device=x.device)
    launch = launch_options(x.device)
    # Each program prefetches one K range per weight row: a row-major weight whose rows start 16-byte aligned.
    row_bytes = k // split_k * weight.element_size()
    aligned = weight.stride(1) == 1 and (weight.stride(0) * weight.element_size()) % 16 == 0
    prefetch = aligned and _prefetch_fits(weight, row_bytes)
    # The preloaded first K step needs shared memory of its own beside the pipelined loop's: some large tiles
    # (FP8's) then ask for more than an SM has, and run without it.
    key = (cfg, weight.dtype, x.dtype, silu, norm is not None, residual is not None, x_scale is not None, tile_m)
    preload = gemv_preload_enabled() and key not in _NO_PRELOAD
    args = (
        x,
        residual if residual is not None else x,
        norm.weight if norm is not None else x,
        weight,
        bias if bias is not None else x,
        scale if scale is not None else x,
        x_scale if x_scale is not None else x,
        y,
        res_out,
        part,
        _split_counters(x.device),
        m,
        n,
        k,
        weight.stride(0),
        weight.stride(1),
        norm.eps if norm is not None else 0.0,
    )
    options = dict(
        NORM=norm is not None,
        RESIDUAL=residual is not None,
        SILU=silu,
        BIAS=bias is not None,
        SCALE=scale is not None,
        BLOCK_M=tile_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        STAGES=stages,
        PDL=bool(launch),
        W_BYTES=weight.element_size(),
        X8=x_scale is not None,
        # max_num_imprecise_acc: how many products the FP8 MMA may sum before promoting to fp32.
        IMPRECISE=None if imprecise else block_k,
        num_warps=warps,
        **launch,
    )
    kernel, grid = _build_rows_kernel(), (n // block_n, split_k)
    if preload:
        from triton.runtime.errors import OutOfResources

        try:  # one K step preloaded whole needs no L2 prefetch
            kernel[grid](*args, **options, PREFETCH=prefetch and k // split_k > block_k, PRELOAD=True)
            return y, res_out
        except OutOfResources:  # raised as the kernel loads, before it launches
            _NO_PRELOAD.add(key)
    kernel[grid](*args, **options, PREFETCH=prefetch, PRELOAD=False)
    return y, res_out


def _launch(x, weight, cfg, bias=None, norm=None, residual=None, silu=False, scale=None):
    # One row: the GEMV; 2..MULTI_MAX_ROWS rows: its multi-row form (gemv_multi_kernel). Row-major weights only.
    block_n, block_k, warps, evict_first = cfg
    m = x.shape[0]
    n = weight.shape[0] // 2 if silu else weight.shape[0]
    k = weight.shape[1]
    if weight.stride(1) != 1 or m > MULTI_MAX_ROWS:
        raise ValueError(f"the GEMV takes a row-major weight and 1..{MULTI_MAX_ROWS} rows, not {m} rows of "
                         f"a weight with strides {weight.stride()}")  # fmt: skip
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(x) if residual is not None else y
    slice_bytes = block_n * weight.stride(0) * weight.element_size()
    launch = launch_options(x.device)  # launch_pdl where PDL is on; the kernel then waits (PDL=True)
    args = [
        x,
        residual if residual is not None else x,
        norm.weight if norm is not None else x,
        weight,
        bias if bias is not None else x,
        scale if scale is not None else x,
        y,
        res_out,
        n,
        k,
        weight.stride(0),
        slice_bytes,
        norm.eps if norm is not None else 0.0,
    ]
    # The one-row kernel loads K steps before the wait; the multi-row kernel does not (0.994x at 2 requests with
    # its first step preloaded, H200, docs/benchmarks.md).
    steps = 0
    if m == 1:
        steps = preload_steps(block_n, block_k, warps, k, weight.element_size(), silu, _fits_quarter_l2(weight))
    prefetch = _prefetch_fits(weight, slice_bytes) and steps * block_k < k  # preloaded whole: no need
    kernel, rows = _build_kernel(), {"PRELOAD": steps, "STEPS_P2": 1 << max(steps - 1, 0).bit_length()}
    if m > 1:  # the multi-row kernel also takes the row count (its last runtime argument) and its tile, 2 or 4
        kernel, rows = _build_multi_kernel(), {"M": m, "ROWS": plan_tile(m)}
    kernel[(n // block_n,)](
        *args,
        NORM=norm is not None,
        RESIDUAL=residual is not None,
        SILU=silu,
        BIAS=bias is not None,
        SCALE=scale is not None,
        **rows,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        EVICT_FIRST=evict_first,
        PDL=bool(launch),
        PREFETCH=prefetch,
        num_warps=warps,
        **launch,
    )
    return y, res_out


def _prefetch_fits(weight: torch.Tensor, slice_bytes: int) -> bool:
    # Only weights that fit a quarter of L2 (Qwen3-0.6B's, not Qwen3-8B's): a prefetched slice of a larger one
    # could be evicted before its program reads it, and be read from memory twice. The bulk prefetch wants
    # 16-byte-aligned slices.
    if not l2_prefetch_enabled(weight.device) or weight.data_ptr() % 16 or slice_bytes % 16:
        return False
    return _fits_quarter_l2(weight)


def _fits_quarter_l2(weight: torch.Tensor) -> bool:
    # The L2 prefetch's and the whole-slice preload's rule for a small weight. Triton's interpreter (CPU tensors,
    # the CI tests) has no L2: its weights count as small.
    return weight.device.type != "cuda" or weight.numel() * weight.element_size() <= _l2_bytes(weight.device) // 4


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def _launcher(cfg: tuple):
    # A GEMV configuration has four fields (rows per program, K step, warps, evict-first), a few-row one five.
    return _launch if len(cfg) == 4 else _launch_rows


def linear_row(x: torch.Tensor, linear, cfg: tuple | None) -> torch.Tensor:
    """linear(x) for one row x [1, in] (or up to MAX_ROWS rows with a few-row cfg): the Triton kernel with cfg, or
    the layer itself when cfg is None."""
    if cfg is None:
        return linear(x)
    return _launcher(cfg)(x, linear.weight, cfg, bias=linear.bias, scale=linear.weight_scale)[0]


def norm_linear_row(x, residual, norm, linear, cfg: tuple | None, act=None):
    """(act(linear(norm(x + residual))), x + residual) for one row (or a few, with a few-row cfg); residual None
    means x is the residual.

    With cfg, one Triton kernel does the add, the norm, the GEMV and (when act is given) the SwiGLU; without, the
    modules run one after another."""
    if cfg is not None:
        silu = act is not None
        y, res_out = _launcher(cfg)(
            x, linear.weight, cfg, bias=linear.bias, norm=norm, residual=residual, silu=silu, scale=linear.weight_scale
        )
        return y, (x if residual is None else res_out)
    if residual is None:
        residual, h = x, norm(x)
    else:
        h, residual = norm(x, residual)
    y = linear(h)
    return (y if act is None else act(y)), residual


def _role_modules(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return {
        "qkv": (layer.input_layernorm, attn.qkv_proj, None),
        "o": (None, attn.o_proj, None),
        "gate_up": (layer.post_attention_layernorm, mlp.gate_up_proj, mlp.act),
        "down": (None, mlp.down_proj, None),
    }


def _unfused_call(x, residual, norm, linear, act):
    if norm is None:
        return functools.partial(linear, x)
    # The unfused add + norm works in place on its inputs: give each call its own.
    return functools.partial(norm_linear_row, x.clone(), residual.clone(), norm, linear, None, act)


def _role_calls(mods, candidates, rows: int = 1) -> tuple[list, dict[tuple, list]]:
    """(unfused calls, {config: Triton calls}) for one role at `rows` token rows, one call per given layer's
    modules, for _time_calls."""
    w0 = mods[0][1].weight
    # Activations are in the model dtype, which an FP8 weight's layer records (engine/layers/fp8.py).
    dtype = getattr(mods[0][1], "act_dtype", w0.dtype)
    x = torch.randn(rows, w0.shape[1], device=w0.device, dtype=dtype)
    residual = torch.randn_like(x) if mods[0][0] is not None else None
    base = [_unfused_call(x, residual, *m) for m in mods]
    # The GEMV reads row-major weights; the few-row kernel takes the weight as it is.
    weights = [lin.weight.contiguous() if rows == 1 else lin.weight for _, lin, _ in mods]
    calls = {
        cfg: [
            functools.partial(
                _launcher(cfg), x, w, cfg, bias=lin.bias, norm=nm, residual=residual, silu=act is not None,
                scale=lin.weight_scale,
            )
            for (nm, lin, act), w in zip(mods, weights, strict=True)
        ]
        for cfg in candidates
    }  # fmt: skip
    return base, calls


def _warm(jobs, device: torch.device) -> None:
    # Every candidate of every (base, calls) job launched once, side by side: Triton compiles them in parallel.
    warm_in_threads([c[0] for _, calls in jobs for c in calls.values()], device)


def time_candidates(calls: dict) -> dict:
    """{key: us per call} of each candidate's calls (cycle_time_us); a configuration too large for this GPU is left
    out."""
    from triton.runtime.errors import OutOfResources

    times = {}
    for key, key_calls in calls.items():
        try:
            times[key] = cycle_time_us(key_calls)
        except OutOfResources:  # a tile too large for this GPU's shared memory: not a candidate here
            continue
    return times


def _time_calls(base: list, calls: dict[tuple, list]) -> tuple[float, dict[tuple, float]]:
    """(unfused us, {config: Triton us}) per call, from _role_calls' calls."""
    times = time_candidates(calls)
    return cycle_time_us(base), times


def _time_role(mods, candidates, rows: int = 1) -> tuple[float, dict[tuple, float]]:
    """(unfused us, {config: Triton us}) per call for one role at `rows` token rows, cycling through the given
    layers' modules."""
    job = _role_calls(mods, candidates, rows)
    _warm([job], mods[0][1].weight.device)
    return _time_calls(*job)


def _rows_candidates(weight: torch.Tensor, tile: int) -> tuple[tuple[int, int, int, int, int], ...]:
    # FP8 weights: the pair measured for FP8 at the row tile the kernel pads these steps to (plan tiles 2 and 4 are
    # 16-row MMA tiles there), which the unfused path (engine/layers/fp8.py) also chooses from.
    return FP8_ROWS_CONFIGS[rows_tile(tile)] if weight.element_size() == 1 else ROWS_CONFIGS


# Row counts each plan tile (plan_tile) is timed at before it is chosen: the tile's typical steps (decode batches of
# 2 and 3-4 requests; of 5-16 requests and 16-token prefill chunks the 16-row tile; 32-token ones the last).
ROWS_TUNE_AT = {2: (2,), 4: (4,), 16: (8, 16), 32: (32,)}


def _multi_candidates(weight: torch.Tensor, n: int, tile: int) -> list[tuple[int, int, int, bool]]:
    # The multi-row GEMV for the 2- and 4-row tiles of a row-major bf16/fp16 weight (the one-row plan made the
    # weights of the roles it took row-major; the kernel reads no other layout).
    if tile > MULTI_MAX_ROWS or weight.stride(1) != 1 or weight.element_size() == 1:
        return []
    return configs_for(n, weight.shape[1], MULTI_CONFIGS[tile])


@torch.inference_mode()
def tune_rows(
    layers, stream_bytes: int, margin: float, max_rows: int | None = None
) -> dict[int, dict[str, tuple | None]]:
    """Per plan tile (2, 4, 16, 32: plan_tile) and role, the Triton configuration for steps of 2..max_rows token
    rows (default gemv_max_rows()): the multi-row GEMV's (four fields, tiles 2 and 4 of row-major weights) or the
    few-row kernel's (five), or None for the unfused cuBLAS + FlashInfer path; kept only when `margin` faster at
    every row count of ROWS_TUNE_AT."""
    mode, max_rows = gemv_mode(), gemv_max_rows() if max_rows is None else max_rows
    if mode == "0" or max_rows <= 1 or not gemv_supported(_role_modules(layers[0])["o"][1].weight):
        return {}
    start = time.perf_counter()
    plans: dict[int, dict[str, tuple | None]] = {}
    notes = []
    jobs = {}  # (tile, role) -> one _role_calls job per row count of ROWS_TUNE_AT
    last_tile = 1
    for tile, row_counts in ROWS_TUNE_AT.items():
        first_row, last_tile = last_tile + 1, tile  # the tile serves steps of first_row..tile rows
        if first_row > max_rows:
            continue
        row_counts = sorted({min(rows, max_rows) for rows in row_counts})
        plan = plans[tile] = {}
        for role in ROLES:
            norm, linear, act = _role_modules(layers[0])[role]
            w0 = linear.weight
            n = w0.shape[0] // 2 if act is not None else w0.shape[0]
            candidates = _multi_candidates(w0, n, tile) + rows_configs_for(n, w0.shape[1], _rows_candidates(w0, tile))
            plan[role] = candidates[0] if candidates and mode == "force" else None
            if not candidates or mode == "force":
                continue
            count = -(-stream_bytes // (w0.numel() * w0.element_size()))
            mods = [_role_modules(layer)[role] for layer in layers[:count]]
            jobs[tile, role] = [_role_calls(mods, candidates, rows) for rows in row_counts]
    # Every tile's, role's and row count's candidates compile side by side first (most of a cold start-up's time).
    _warm([job for tile_jobs in jobs.values() for job in tile_jobs], layers[0].mlp.down_proj.weight.device)
    for (tile, role), role_jobs in jobs.items():
        timed = [_time_calls(*job) for job in role_jobs]
        fits = [c for c in role_jobs[0][1] if all(c in t for _, t in timed)]  # the candidates, in their order
        if not fits:
            continue
        best = min(fits, key=lambda c: sum(t[c] / base for base, t in timed))
        if all(t[best] < base * (1 - margin) for base, t in timed):
            plans[tile][role] = best
        ratios = "/".join(f"{t[best] / base:.2f}" for base, t in timed)
        notes.append(f"{tile}-row {role} {ratios} ({best})")
    if notes:
        elapsed = time.perf_counter() - start
        logger.info("few-row GEMMs (timed in %.1fs), Triton / unfused time: %s", elapsed, "; ".join(notes))
    return plans


@torch.inference_mode()
def tune_gemv(layers, stream_bytes: int, margin: float, ranked: dict | None = None) -> dict[str, tuple | None]:
    """Per role (qkv, o, gate_up, down), the Triton GEMV configuration to use at one row, or None for the unfused
    cuBLAS + FlashInfer path; timed over the layers' own weights (up to stream_bytes of them, so they stream from
    memory) and kept only when `margin` faster. Weights of a chosen role are made row-major. `ranked`, when given,
    receives each chosen role's STEP_TRIES fastest configurations, fastest first, for a timing in the whole step."""
    mode = gemv_mode()
    if mode == "0" or not gemv_supported(_role_modules(layers[0])["o"][1].weight):
        return {}
    start = time.perf_counter()
    plan: dict[str, tuple | None] = {}
    notes = []
    jobs = {}
    for role in ROLES:
        norm, linear, act = _role_modules(layers[0])[role]
        w0 = linear.weight
        candidates = configs_for(w0.shape[0] // 2 if act is not None else w0.shape[0], w0.shape[1], gemv_configs(w0))
        plan[role] = candidates[0] if candidates and mode == "force" else None
        if not candidates or mode == "force":
            continue
        count = -(-stream_bytes // (w0.numel() * w0.element_size()))
        jobs[role] = _role_calls([_role_modules(layer)[role] for layer in layers[:count]], candidates)
    _warm(jobs.values(), layers[0].mlp.down_proj.weight.device)  # every role's candidates compile side by side
    for role, job in jobs.items():
        base, times = _time_calls(*job)
        best = min(times, key=times.get)
        plan[role] = best if times[best] < base * (1 - margin) else None
        if ranked is not None and plan[role] is not None:
            ranked[role] = sorted(times, key=times.get)[:STEP_TRIES]
        notes.append(f"{role} {times[best] / base:.2f} ({times[best]:.1f} vs {base:.1f} us, {best})")
    if notes:
        # Most of the time is Triton compiling each configuration once; its cache makes later starts faster.
        elapsed = time.perf_counter() - start
        logger.info("one-row GEMVs (timed in %.1fs), Triton / unfused time: %s", elapsed, "; ".join(notes))
    for role, cfg in plan.items():
        if cfg is not None:
            for layer in layers:
                lin = _role_modules(layer)[role][1]
                lin.weight.data = lin.weight.data.contiguous()
    return plan


def reference_gemv(x, weight, bias=None, norm_weight=None, eps=1e-6, residual=None, silu=False):
    """The fused kernel's computation in plain torch (fp32 math, rounding where the unfused path stores)."""
    dtype = x.dtype
    h = x.float()
    new_residual = None
    if norm_weight is not None:
        if residual is not None:
            h = (h + residual.float()).to(dtype).float()
            new_residual = h.to(dtype)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(dtype).float()
    y = F.linear(h, weight.float(), None if bias is None else bias.float())
    if silu:
        gate, up = y.to(dtype).float().chunk(2, -1)
        y = F.silu(gate) * up
    return y.to(dtype), new_residual
