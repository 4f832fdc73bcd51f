"""The one-row Triton GEMV (engine/layers/gemv.py) against the same computation in torch, at real layer shapes."""

from __future__ import annotations

import types

import pytest
import torch

from engine.layers.gemv import GEMV_CONFIGS, SMALL_K_CONFIGS, _launch, _prefetch_fits, configs_for, reference_gemv
from engine.layers.kernels import pdl_enabled

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


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("n,k,silu,bias,norm,residual", CASES)
def test_gemv_matches_torch(n, k, silu, bias, norm, residual, pdl, monkeypatch):
    # pdl "1": launched with programmatic dependent launch, small weights prefetched into L2 first; "0": plain.
    monkeypatch.setenv("NANOVLLM_PDL", pdl)
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


def test_configs_cover_the_benchmark_shapes():
    """Every projection of the Qwen3-0.6B and Qwen3-8B shapes has configurations to choose from."""
    for n, k in [(4096, 1024), (1024, 2048), (3072, 1024), (1024, 3072), (6144, 4096), (4096, 4096),
                 (12288, 4096), (4096, 12288)]:  # fmt: skip
        assert set(configs_for(n, k)) <= set(GEMV_CONFIGS + SMALL_K_CONFIGS) and configs_for(n, k)
