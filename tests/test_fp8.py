"""FP8 weights (quantization="fp8", engine/layers/fp8.py) on the CPU: the quantizers' rounding, the widened-weight
path, and the errors for where FP8 cannot run. The Triton kernels that read FP8, and cuBLASLt's FP8 GEMM for FP8
activations, run on CUDA only (tests/gpu/test_gemv.py, tests/gpu/test_gpu_parity.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import load_fp8_weights_into_hf

from engine import LLM, SamplingParams
from engine.layers import fp8
from engine.layers.fp8 import FP8_DTYPE, FP8_MAX, QUANTIZED_ROLES, dequantize_fp8, fp8_linear, quantize_fp8


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


def test_activation_quantizer_scales_each_token_row_alone():
    """quantize_rows_torch (what the GPU kernel must equal bit for bit): each row's largest magnitude maps to 448,
    an all-zero row stays zero, and each row's values depend on that row only."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 200, generator=g) * torch.logspace(-3, 2, 6)[:, None]).to(torch.bfloat16)
    x[2] = 0
    x8, sx = fp8.quantize_rows_torch(x)
    assert x8.dtype == FP8_DTYPE and sx.dtype == torch.float32 and sx.shape == (6, 1)
    peaks = x8.float().abs().amax(1)
    assert peaks[2] == 0 and torch.equal(peaks[[0, 1, 3, 4, 5]], torch.full((5,), FP8_MAX))
    back, xf = x8.float() * sx, x.float()
    assert ((back - xf).abs() <= 2.0**-4 * xf.abs() + 2.0**-10 * sx * 1.0001).all()
    assert (back - xf).abs().max() > 0
    alone8, alone_s = fp8.quantize_rows_torch(x[4:5])
    assert torch.equal(alone8.view(torch.uint8), x8[4:5].view(torch.uint8)) and torch.equal(alone_s, sx[4:5])


def test_fused_quantizing_references_quantize_the_norm_and_swiglu_outputs():
    """The references the fused GPU kernels are checked against (add_rmsnorm_quantize_torch, silu_mul_quantize_torch)
    quantize what the engine's RMSNorm and SwiGLU modules compute, within one e4m3 step (their bf16 roundings
    differ by one place at most), and return x + residual as the new residual."""
    from engine.layers.activation import SiluAndMul
    from engine.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 96, generator=g) * torch.logspace(-2, 2, 5)[:, None]).to(torch.bfloat16)
    residual = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(96, generator=g))
    norm = norm.to(torch.bfloat16)
    x8, sx, res = fp8.add_rmsnorm_quantize_torch(x, residual, norm.weight, norm.eps)
    want, want_res = norm(x, residual)
    assert torch.equal(res, want_res) and res.dtype == torch.bfloat16
    assert_within_a_step(x8.float() * sx, want.float(), sx)
    x8, sx, res = fp8.add_rmsnorm_quantize_torch(x, None, norm.weight, norm.eps)
    assert res is x
    assert_within_a_step(x8.float() * sx, norm(x).float(), sx)
    gate_up = torch.randn(5, 2 * 96, generator=g).to(torch.bfloat16) * 3
    a8, sa = fp8.silu_mul_quantize_torch(gate_up)
    assert a8.shape == (5, 96)
    assert_within_a_step(a8.float() * sa, SiluAndMul()(gate_up).float(), sa)


def assert_within_a_step(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """got is want quantized per row: within 2^-4 relative plus a bf16 rounding, or half the subnormal step."""
    assert ((got - want).abs() <= (2.0**-4 + 2.0**-8) * want.abs() + 2.0**-10 * scale * 1.0001).all()
    assert (got - want).abs().max() > 0


@pytest.mark.parametrize(
    "name,read,default",
    [("NANOVLLM_FP8_FUSED_QUANT", "fused_quantize", True), ("NANOVLLM_FP8_FAST_ACCUM", "fast_accumulation", True)],
)
def test_fp8_switch_settings_are_checked(name, read, default, monkeypatch):
    """NANOVLLM_FP8_FUSED_QUANT (on when unset) and NANOVLLM_FP8_FAST_ACCUM (both on when unset): "1" on, "0" off,
    anything else an error naming the value and the choices."""
    read = getattr(fp8, read)
    monkeypatch.delenv(name, raising=False)
    assert read() is default
    for value, on in (("0", False), ("1", True)):
        monkeypatch.setenv(name, value)
        assert read() is on
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}='yes' is not one of '0', '1'"):
        read()


def test_fp8_activation_rows_setting_is_checked(monkeypatch):
    """NANOVLLM_FP8_ACT_MIN_ROWS: 2 when unset, a whole number when set, anything else an error naming it."""
    monkeypatch.delenv("NANOVLLM_FP8_ACT_MIN_ROWS", raising=False)
    assert fp8.act_min_rows() == 2
    monkeypatch.setenv("NANOVLLM_FP8_ACT_MIN_ROWS", "0")
    assert fp8.act_min_rows() == 0
    monkeypatch.setenv("NANOVLLM_FP8_ACT_MIN_ROWS", "many")
    with pytest.raises(ValueError, match="NANOVLLM_FP8_ACT_MIN_ROWS='many'"):
        fp8.act_min_rows()


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


@pytest.mark.parametrize("name", ["Qwen3-0.6B", "Qwen3-8B", "Llama-3.2-1B"])
def test_every_fp8_row_tile_has_a_kernel_configuration_for_real_model_shapes(name):
    """Each projection of these models at every row tile up to MAX_FP8_ROWS has an FP8 configuration whose tiles
    divide it, so no decode batch falls back to widening the weight (1.2-5.5x slower on an H200)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from common import model_config

    from engine.layers.fp8 import FP8_ROWS_CONFIGS, MAX_FP8_ROWS, _default_config
    from engine.layers.gemv import rows_tile

    c = model_config(name)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    shapes = [(q + 2 * kv, c.hidden_size), (c.hidden_size, q), (2 * c.intermediate_size, c.hidden_size)]
    shapes.append((c.hidden_size, c.intermediate_size))
    tiles = sorted({rows_tile(m) for m in range(2, MAX_FP8_ROWS + 1)})
    assert tiles == sorted(FP8_ROWS_CONFIGS)
    for n, k in shapes:
        for tile in tiles:
            assert _default_config(n, k, tile) in FP8_ROWS_CONFIGS[tile], f"{name} {n}x{k} at {tile} rows"


def test_fp8_is_refused_where_it_cannot_run(qwen3_path):
    with pytest.raises(ValueError, match="quantization='fp8' needs a CUDA GPU.*cpu.*quantization=None"):
        LLM(qwen3_path, device="cpu", quantization="fp8")
    with pytest.raises(ValueError, match=r"quantization\n.*'fp8'.*'int4'"):
        LLM(qwen3_path, device="cpu", quantization="int4")


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])  # qwen2: a biased QKV projection
def test_fp8_engine_decodes_as_hf_on_the_weights_fp8_stands_for(tiny_models, arch, monkeypatch):
    """The FP8 plumbing (which projections, packed shards, each layer's forward through fp8_linear, the row scales
    and biases) on the CPU's widened path: greedy tokens equal HF fp32 generate() on the dequantized weights. The
    engine refuses FP8 on the CPU (its kernels are CUDA-only); the check is patched out here so CI runs the rest."""
    from transformers import AutoModelForCausalLM

    import engine.llm

    monkeypatch.setattr(engine.llm, "fp8_unsupported_reason", lambda device, dtype: None)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 375, (n,), generator=g).tolist() for n in (5, 17, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    llm = LLM(tiny_models[arch], device="cpu", quantization="fp8", enable_prefix_caching=False)
    try:
        layers = llm.runner.model.layers
        assert all(layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE for layer in layers)
        projections = [layer.get_submodule(path) for layer in layers for path in QUANTIZED_ROLES]
        numel = sum(p.numel() for p in llm.runner.model.parameters())
        # fp32 everywhere but the projections' one byte per weight, plus their fp32 row scales
        expected = 4 * numel - 3 * sum(m.weight.numel() for m in projections)
        assert llm.memory()["weights_bytes"] == expected + 4 * sum(m.weight.shape[0] for m in projections)
        outs = [o.token_ids for o in llm.generate(prompts, params)]
        hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
        plain = hf.model.layers[0].mlp.down_proj.weight.clone()
        load_fp8_weights_into_hf(hf, llm)
    finally:
        llm.shutdown()
    assert not torch.equal(plain, hf.model.layers[0].mlp.down_proj.weight)  # the reference did change
    ref = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
        ref.append(ids[0, len(p) :].tolist())
    assert outs == ref
