"""The one-row Triton GEMV (engine/layers/gemv.py) against the same computation in torch, at real layer shapes."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from engine.layers.gemv import (
    GEMV_CONFIGS,
    MULTI_CONFIGS,
    ROWS_CONFIGS,
    SMALL_K_CONFIGS,
    _launch,
    _launch_rows,
    _prefetch_fits,
    configs_for,
    gemv_configs,
    reference_gemv,
    rows_configs_for,
    rows_tile,
)
from engine.layers.kernels import pdl_enabled

sys.path.insert(0, str(Path(__file__).parent.parent))

from triton_checks import check_multi_row_gemv, gemv_operands  # noqa: E402

# (N, K, silu, bias, norm, residual): Qwen3-0.6B qkv / o / gate_up / down, a Qwen2-style biased qkv without a
# residual (the first layer), Qwen3-8B gate/up, SmolLM2's K=576.
CASES = [
    (4096, 1024, False, False, True, True),
    (1024, 2048, False, False, False, False),
    (3072, 1024, True, False, True, True),
    (1024, 3072, False, False, False, False),
    (1280, 1024, False, True, True, False),
    (12288, 4096, True, False, True, True),
    (1536, 576, True, False, True, True),
]


@pytest.mark.parametrize("pdl,preload", [("1", "all"), ("1", "1"), ("1", "0"), ("0", "all")])
@pytest.mark.parametrize("n,k,silu,bias,norm,residual", CASES)
def test_gemv_matches_torch(n, k, silu, bias, norm, residual, pdl, preload, monkeypatch):
    # pdl "1": launched with programmatic dependent launch, small weights prefetched into L2 first; "0": plain.
    # preload "all": as many K steps as fit loaded before the wait (and before the norm pass); "1": the first.
    monkeypatch.setenv("NANOVLLM_PDL", pdl)
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", preload)
    g = torch.Generator(device="cuda").manual_seed(n + k)
    dt, dev = torch.bfloat16, "cuda"
    rows = 2 * n if silu else n
    w = (torch.randn(rows, k, device=dev, generator=g) / k**0.5).to(dt)
    x = torch.randn(1, k, device=dev, generator=g).to(dt)
    r = torch.randn(1, k, device=dev, generator=g).to(dt) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device=dev, generator=g)).to(dt) if norm else None
    b = torch.randn(rows, device=dev, generator=g).to(dt) if bias else None
    nm = types.SimpleNamespace(weight=nw, eps=1e-6) if norm else None
    ref, ref_res = reference_gemv(x, w, b, nw, 1e-6, r, silu)
    configs = configs_for(n, k)
    assert configs, f"no configuration fits {n}x{k}"
    sm90 = torch.cuda.get_device_capability()[0] >= 9
    assert pdl_enabled(w.device) == (sm90 and pdl == "1")
    if sm90 and pdl == "1" and w.numel() * 2 <= 4 * 2**20:  # a 0.6B-sized weight takes the prefetch
        assert _prefetch_fits(w, configs[0][0] * k * 2)
    for cfg in configs:
        y, res_out = _launch(x, w, cfg, bias=b, norm=nm, residual=r, silu=silu)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, f"{cfg}: relative error {err:.2e}"
        if residual:
            assert torch.equal(res_out, ref_res), f"{cfg}: the new residual differs"
    # the reference itself is not trivially equal to a plain GEMV of x (so the comparison checks the fusion)
    if norm or silu:
        plain = torch.nn.functional.linear(x.float(), w.float()).to(dt)
        assert plain.shape != ref.shape or not torch.allclose(plain.float(), ref.float(), rtol=1e-1)


def _operands(n, k, m, silu, bias, norm, residual):
    return gemv_operands(n, k, m, silu, bias, norm, residual)


@pytest.mark.parametrize("m,preload", [(3, "1"), (32, "1"), (3, "0")])
@pytest.mark.parametrize("n,k,silu,bias,norm,residual", CASES[:5])
def test_few_row_kernel_matches_torch(n, k, silu, bias, norm, residual, m, preload, monkeypatch):
    """Every few-row configuration that fits, row-major and column-major weights, padded 16- and 32-row tiles, with
    and without the first K step's weights loaded before the PDL wait."""
    monkeypatch.setenv("NANOVLLM_GEMV_PRELOAD", preload)
    w, x, r, nw, b = _operands(n, k, m, silu, bias, norm, residual)
    nm = types.SimpleNamespace(weight=nw, eps=1e-6) if norm else None
    ref, ref_res = reference_gemv(x, w, b, nw, 1e-6, r, silu)
    configs = rows_configs_for(n, k)
    assert configs and any(c[4] > 1 for c in configs)  # K splits, whose last arrival finishes the norm / SwiGLU
    for weight in (w, w.t().contiguous().t()):
        for cfg in configs:
            for _ in range(2):  # twice: the split-K arrival counters must be back at zero after a launch
                y, res_out = _launch_rows(x, weight, cfg, bias=b, norm=nm, residual=r, silu=silu)
                err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                assert err < 1e-2, f"{cfg}, strides {weight.stride()}: relative error {err:.2e}"
                if residual:
                    assert torch.equal(res_out, ref_res), f"{cfg}: the new residual differs"


@pytest.mark.parametrize("m,pdl", [(2, "1"), (3, "1"), (3, "0")])
@pytest.mark.parametrize("n,k,silu,bias,norm,residual", CASES)
def test_multi_row_gemv_matches_torch(n, k, silu, bias, norm, residual, m, pdl, monkeypatch):
    """The GEMV's multi-row form at 2-4 token rows, each row against torch, in every configuration the engine times
    (tests/triton_checks.py), launched with and without programmatic dependent launch."""
    monkeypatch.setenv("NANOVLLM_PDL", pdl)
    check_multi_row_gemv(m, n, k, norm, silu, bias)


@pytest.mark.parametrize("pdl", ["1", "0"])
def test_few_row_kernel_in_a_graph_with_and_without_pdl(pdl, monkeypatch):
    """Qwen3-0.6B's o and gate/up projections chained in one CUDA graph (the second reads the first's output and the
    residual), with and without programmatic dependent launch: the replays give exactly the eager launches' result,
    which is within tolerance of torch."""
    monkeypatch.setenv("NANOVLLM_PDL", pdl)
    m = 8
    w_o, x, r, _, _ = _operands(1024, 2048, m, False, False, False, False)
    w_gu, _, r, nw, _ = _operands(3072, 1024, m, True, False, True, True)
    nm = types.SimpleNamespace(weight=nw, eps=1e-6)
    cfg_o = next(c for c in rows_configs_for(1024, 2048) if c[4] > 1)
    cfg_gu = next(c for c in rows_configs_for(3072, 1024) if c[4] > 1)

    def chain():
        h, _ = _launch_rows(x, w_o, cfg_o)
        return _launch_rows(h, w_gu, cfg_gu, norm=nm, residual=r, silu=True)

    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    h_ref, _ = reference_gemv(x, w_o)
    ref, _ = reference_gemv(h_ref, w_gu, None, nw, 1e-6, r, True)
    assert ((eager[0].float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2


def test_configs_cover_the_benchmark_shapes():
    """Every projection of the Qwen3-0.6B and Qwen3-8B shapes has one-row, few-row and multi-row configurations to
    choose from."""
    for n, k in [(4096, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (6144, 4096), (4096, 4096),
                 (12288, 4096), (4096, 12288)]:  # fmt: skip
        assert set(configs_for(n, k)) <= set(GEMV_CONFIGS + SMALL_K_CONFIGS) and configs_for(n, k)
        assert set(rows_configs_for(n, k)) <= set(ROWS_CONFIGS) and rows_configs_for(n, k)
        for tile, configs in MULTI_CONFIGS.items():
            assert set(configs_for(n, k, configs)) <= set(configs) and configs_for(n, k, configs), (n, k, tile)


@pytest.mark.parametrize("m", [1, 3, 32, 48, 200, 300])
@pytest.mark.parametrize("n,k,silu,bias,norm,residual", CASES[:6])
def test_fp8_weights_match_their_dequantized_bf16(n, k, silu, bias, norm, residual, m, monkeypatch):
    """FP8 weights with row scales (engine/layers/fp8.py) through the one-row GEMV (m=1), every few-row configuration
    (3, 32), the FP8 tiles of 33-256 rows (48, 200) and the widen-then-cuBLAS path (300): the result of the same
    computation on the weight they stand for."""
    from engine.layers import fp8
    from engine.layers.fp8 import FP8_DTYPE, FP8_ROWS_CONFIGS, MAX_FP8_ROWS, dequantize_fp8, fp8_linear, quantize_fp8

    monkeypatch.setattr(fp8, "ACT_MIN_ROWS", 0)  # the weight-only paths; FP8 activations have their own test
    w, x, r, nw, b = _operands(n, k, m, silu, bias, norm, residual)
    w8, scale = quantize_fp8(w)
    assert w8.dtype == FP8_DTYPE and w8.element_size() == 1
    nm = types.SimpleNamespace(weight=nw, eps=1e-6) if norm else None
    deq = dequantize_fp8(w8, scale, torch.float32)
    ref, ref_res = reference_gemv(x, deq, b, nw, 1e-6, r, silu)
    # FP8 changed the weight: the unquantized weight's result is not what the kernels must give.
    assert rel(reference_gemv(x, w, b, nw, 1e-6, r, silu)[0], ref) > 1e-3
    if m > 32:  # the module's plain projection (no fused norm or SwiGLU at this size)
        plain = reference_gemv(x, deq, b)[0]
        if m <= MAX_FP8_ROWS:
            fits = rows_configs_for(w8.shape[0], k, FP8_ROWS_CONFIGS[rows_tile(m)])
            assert fits, f"no FP8 tile of {rows_tile(m)} rows fits {w8.shape[0]}x{k}"
            for cfg in fits:
                y = _launch_rows(x, w8, cfg, bias=b, scale=scale)[0]
                assert rel(y, plain) < 1e-2, f"{cfg}: relative error {rel(y, plain):.2e}"
        calls = []
        monkeypatch.setattr(fp8, "_launch_rows", lambda *a, **kw: calls.append(a[2]) or _launch_rows(*a, **kw))
        assert rel(fp8_linear(x, w8, scale, b), plain) < 1e-2
        # Up to MAX_FP8_ROWS rows the module's forward reads the FP8 weight in the kernel; past it, it widens.
        assert (calls == [FP8_ROWS_CONFIGS[rows_tile(m)][0]]) if m <= MAX_FP8_ROWS else not calls
        return
    if m == 1:
        launch, configs = _launch, configs_for(n, k, gemv_configs(w8))
    else:
        launch, configs = _launch_rows, rows_configs_for(n, k) + rows_configs_for(n, k, FP8_ROWS_CONFIGS[rows_tile(m)])
    assert configs
    for cfg in configs:
        y, res_out = launch(x, w8, cfg, bias=b, norm=nm, residual=r, silu=silu, scale=scale)
        assert rel(y, ref) < 1e-2, f"{cfg}: relative error {rel(y, ref):.2e}"
        if residual:
            assert torch.equal(res_out, ref_res), f"{cfg}: the new residual differs"
    if not (norm or silu):  # the module's own forward takes the same kernels
        assert rel(fp8_linear(x, w8, scale, b), ref) < 1e-2


@pytest.mark.parametrize("fast_accum", [False, True])
@pytest.mark.parametrize("m", [2, 48, 300])
@pytest.mark.parametrize("n,k,bias", [(4096, 1024, True), (1024, 3072, False), (4096, 12288, False)])
def test_fp8_activations_match_their_quantized_product(n, k, bias, m, fast_accum, monkeypatch):
    """FP8 activations (W8A8): quantize_rows gives torch's quantization bit for bit (rows of any scale, an all-zero
    row, K not a power of two), fp8_act_linear the product of the quantized activations and the weight FP8 stands
    for (2 and 48 rows on the Triton kernel's default shapes, 300 on cuBLASLt with partial sums promoted to fp32 or
    not: NANOVLLM_FP8_FAST_ACCUM), and fp8_linear takes that path from ACT_MIN_ROWS rows on."""
    from engine.layers import fp8

    monkeypatch.setattr(fp8, "FAST_ACCUM", fast_accum)

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    w8, scale = fp8.quantize_fp8(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-3, 2, m, device="cuda")[:, None]
    x[0] = 0
    x = x.bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
    x8, sx = fp8.quantize_rows(x)
    ref8, ref_sx = fp8.quantize_rows_torch(x)
    assert torch.equal(sx, ref_sx) and torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8))
    deq = fp8.dequantize_fp8(w8, scale, torch.float32)
    ref = (x8.float() * sx) @ deq.t() + (0 if b is None else b.float())
    # Quantizing the activations changed the product: the unquantized activations' result is not the reference.
    assert rel(x.float() @ deq.t() + (0 if b is None else b.float()), ref) > 1e-3
    y = fp8.fp8_act_linear(x, w8, scale, b)
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2, f"relative error {rel(y, ref):.2e}"
    calls = []
    monkeypatch.setattr(fp8, "fp8_act_linear", lambda *a: calls.append(a) or y)
    for threshold, taken in ((m, True), (m + 1, False), (0, False)):
        monkeypatch.setattr(fp8, "ACT_MIN_ROWS", threshold)
        calls.clear()
        fp8.fp8_linear(x, w8, scale, b)
        assert bool(calls) == taken, f"ACT_MIN_ROWS={threshold}, {m} rows"


@pytest.mark.parametrize("imprecise", [False, True])
@pytest.mark.parametrize("m", [1, 48, 256])
@pytest.mark.parametrize("n,k,bias", [(6144, 4096, True), (1024, 3072, False)])
def test_fp8_few_row_kernel_on_fp8_activations_matches_their_product(n, k, bias, m, imprecise):
    """The few-row kernel reading FP8 activations with their row scales (X8) gives the product of the quantized
    activations and the weight FP8 stands for, with the partial sums promoted to fp32 or not, for every token row
    count up to a 256-row tile (rows past m masked off) and with the K split or whole."""
    from engine.layers import fp8

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    w8, scale = fp8.quantize_fp8(torch.randn(n, k, device="cuda", generator=g) / k**0.5)
    x = torch.randn(m, k, device="cuda", generator=g) * torch.logspace(-3, 2, m, device="cuda")[:, None]
    x8, sx = fp8.quantize_rows_torch(x.bfloat16())
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if bias else None
    ref = (x8.float() * sx) @ fp8.dequantize_fp8(w8, scale, torch.float32).t() + (0 if b is None else b.float())
    configs = rows_configs_for(n, k, ((64, 128, 4, 3, 4), (128, 256, 8, 2, 1), (64, 256, 4, 2, 4)))
    assert {c[4] for c in configs} >= {1, 4}
    for cfg in configs:
        y, _ = _launch_rows(
            x8, w8, cfg, bias=b, scale=scale, x_scale=sx, out_dtype=torch.bfloat16, imprecise=imprecise
        )  # fmt: skip
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        # Row by row: the rows' scales span five decades, and a wrong row scale would hide in the whole's norm.
        err = (y.float() - ref).norm(dim=1) / ref.norm(dim=1)
        assert err.max() < 1e-2, f"{cfg}: relative error {err.max():.2e} in row {err.argmax()}"


def assert_same_quantization(got, ref, what: str) -> None:
    """Two per-row FP8 quantizations of nearly the same values: the same codes but where the unquantized values
    differed by a rounding (at most 0.1% of them), and those one e4m3 step apart at most."""
    (q, s), (rq, rs) = got, ref
    assert torch.allclose(s, rs, rtol=1e-2, atol=0), f"{what}: scales differ by {((s - rs) / rs).abs().max():.2e}"
    differ = (q.view(torch.uint8) != rq.view(torch.uint8)).float().mean().item()
    assert differ <= 1e-3, f"{what}: {differ:.2%} of the FP8 codes differ"
    a, b = q.float() * s, rq.float() * rs
    # One e4m3 step: 2^-3 of the value for normal values, 2^-9 of the row scale below them.
    assert ((a - b).abs() <= 2.0**-3 * b.abs() + 2.0**-9 * rs * 1.01).all(), f"{what}: a code more than one step off"


@pytest.mark.parametrize("m", [1, 64, 300])
@pytest.mark.parametrize("k", [1024, 4096, 3072, 1040, 12288])
def test_fused_fp8_quantizing_kernels_match_torch(k, m):
    """The add + RMSNorm + quantize kernel (before qkv and gate/up) and the SwiGLU + quantize kernel (before down)
    against the same computation in torch: the new residual bit for bit, the FP8 codes and row scales up to the
    rounding of the normed or activated value; rows of very different scales, an all-zero row, K not a power of
    two."""
    from engine.layers import fp8

    g = torch.Generator(device="cuda").manual_seed(m + k)
    scales = torch.logspace(-3, 2, m, device="cuda")[:, None]
    x = (torch.randn(m, k, device="cuda", generator=g) * scales).bfloat16()
    residual = (torch.randn(m, k, device="cuda", generator=g) * scales).bfloat16()
    residual[0], x[0] = 0, 0
    weight = (1 + 0.5 * torch.randn(k, device="cuda", generator=g)).bfloat16()
    *ref, ref_res = fp8.add_rmsnorm_quantize_torch(x, residual, weight, 1e-6)
    *got, res = fp8.add_rmsnorm_quantize(x, residual, weight, 1e-6)
    assert res is residual and torch.equal(res, ref_res), "the new residual differs from x + residual"
    assert_same_quantization(got, ref, "add + RMSNorm")
    # The first layer has no residual yet: x is the residual, and stays as it was.
    x_before = x.clone()
    *got, res = fp8.add_rmsnorm_quantize(x, None, weight, 1e-6)
    assert res is x and torch.equal(x, x_before)
    assert_same_quantization(got, fp8.add_rmsnorm_quantize_torch(x, None, weight, 1e-6)[:2], "RMSNorm")
    # SwiGLU: gate and up side by side, as the packed gate/up projection writes them.
    gate_up = torch.cat([x * 4, torch.randn(m, k, device="cuda", generator=g).bfloat16()], dim=1)
    assert_same_quantization(fp8.silu_mul_quantize(gate_up), fp8.silu_mul_quantize_torch(gate_up), "SwiGLU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a against b."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
