"""FP8 weights (quantization="fp8", engine/layers/fp8.py) on the CPU: the quantizer's rounding, the widened-weight
path, and the errors for where FP8 cannot run. The Triton kernels that read FP8 run on CUDA only
(tests/gpu/test_gemv.py, tests/gpu/test_gpu_parity.py)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.layers.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8


def test_quantizer_scales_each_row_to_the_fp8_range_and_rounds_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes, one with an outlier: each gets its own scale.
    w = torch.randn(64, 256, generator=g) * torch.logspace(-4, 1, 64)[:, None]
    w[3, 7] = 50.0
    w8, scale = quantize_fp8(w.to(torch.bfloat16))
    assert w8.dtype == FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (64,)
    wb = w.to(torch.bfloat16).float()
    assert torch.allclose(scale, wb.abs().amax(1) / FP8_MAX)
    assert torch.equal(w8.float().abs().amax(1), torch.full((64,), FP8_MAX))  # each row's largest maps to 448
    back = dequantize_fp8(w8, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits: within 2^-4 relative for normal values, half of the 2^-9 subnormal step below.
    bound = 2.0**-4 * wb.abs() + 2.0**-10 * scale[:, None] * 1.0001
    assert ((back - wb).abs() <= bound).all()
    assert (back - wb).abs().max() > 0  # and it did round: FP8 is not the bf16 weight


def test_widened_weight_path_equals_a_linear_on_the_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g) / 8
    x = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    w8, scale = quantize_fp8(w)
    ref = torch.nn.functional.linear(x.float(), dequantize_fp8(w8, scale, torch.float32), bias.float())
    y = fp8_linear(x, w8, scale, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (40, 96)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    # Without the scale the result would be off by the scale: the path applies it.
    plain = torch.nn.functional.linear(x.float(), w8.float(), bias.float())
    assert ((plain - ref).norm() / ref.norm()).item() > 0.5


def test_fp8_is_refused_where_it_cannot_run(qwen3_path):
    with pytest.raises(ValueError, match="quantization='fp8' needs a CUDA GPU.*cpu.*quantization=None"):
        LLM(qwen3_path, device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match=r"quantization\n.*'fp8'.*'int4'"):
        LLM(qwen3_path, device="cpu", quantization="int4")
