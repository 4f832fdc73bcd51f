"""Every engine Triton kernel, launched the way the engine launches it, compiles for sm90 (H100/H200) without a GPU.

Why: the interpreter tests run a kernel's Python on the CPU but never compile it, and a kernel can pass them yet not
compile for the GPU (a name set before a loop and reassigned in it with another shape, docs/benchmarks.md section
1; a `tl.dot` tile under 16 rows; an inline-asm constraint). Here each launch (the engine's own launchers, on CPU
tensors) is caught at `JITFunction.run` and compiled for `GPUTarget("cuda", 90, 32)` with the same constexprs and
options, PDL and the L2 prefetch on. `make sm90-check` runs this file with the GPU host's Triton (3.6; CI has 3.8).
What only the GPU can say (shared memory past an SM's, speed, numbers) it cannot.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.float32: "*fp32",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.float8_e4m3fn: "*fp8e4nv",
    torch.uint8: "*u8",
}
COMPILE_OPTIONS = ("num_warps", "num_stages")


def arg_type(value) -> str:
    """Triton's signature type of a runtime argument, as the launcher passed it."""
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__} {value!r}")


class Sm90Compiler:
    """Stands for `JITFunction.run`: compiles each distinct launch for sm90 and launches nothing."""

    def __init__(self):
        self.compiled: dict[tuple, str] = {}

    def run(self, fn: JITFunction, *args, grid, warmup=False, **kwargs):
        params = fn.params
        names = [p.name for p in params]
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})  # the rest are launch options
        constexprs, signature = {}, {}
        for i, p in enumerate(params):
            value = values[p.name]
            if p.is_constexpr or value is None:
                constexprs[(i,)] = value
                signature[p.name] = "constexpr"
            else:
                signature[p.name] = arg_type(value)
        options = {k: kwargs[k] for k in COMPILE_OPTIONS if k in kwargs}
        key = (fn.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(options.items()))
        if key in self.compiled:
            return None
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        try:
            kernel = triton.compile(src, target=TARGET, options=options)
        except Exception as exc:
            named = {p.name: values[p.name] for p in params if p.is_constexpr}
            raise AssertionError(f"{fn.fn.__name__} does not compile for sm90 with {named} {options}: {exc}") from exc
        self.compiled[key] = kernel.asm["ptx"]
        return None


@pytest.fixture
def sm90(monkeypatch):
    """Launches compile for sm90 instead of running; PDL and the L2 prefetch are on, as on the GPU host."""
    import engine.layers.gemv as gemv
    import engine.layers.kernels as kernels

    compiler = Sm90Compiler()
    monkeypatch.setattr(JITFunction, "run", lambda fn, *a, **kw: compiler.run(fn, *a, **kw))
    monkeypatch.setattr(kernels, "pdl_enabled", lambda device: True)
    monkeypatch.setattr(gemv, "l2_prefetch_enabled", lambda device: True)
    monkeypatch.setattr(gemv, "_l2_bytes", lambda device: 50 << 20)  # an H100's L2: Qwen3-0.6B's weights fit
    return compiler


def _weights(n, k, silu, dtype=torch.bfloat16):
    rows = 2 * n if silu else n
    return torch.zeros(rows, k, dtype=dtype), torch.zeros(1, k, dtype=torch.bfloat16)


def _named(compiler, name) -> list[str]:
    return [ptx for key, ptx in compiler.compiled.items() if key[0] == name]


@pytest.mark.parametrize("preload", ["all", "1", "0"])
def test_one_and_multi_row_gemvs_compile_for_sm90(sm90, preload):
    """The one-row GEMV in every configuration the engine times, for Qwen3-0.6B's down, gate/up (norm, residual,
    SwiGLU) and qkv (norm, bias) shapes and FP8 weights, with each NANOVLLM_GEMV_PRELOAD mode; its multi-row form
    at 2 and 4 rows."""
    from engine.layers.gemv import MULTI_CONFIGS, _launch, configs_for, gemv_configs

    norm = SimpleNamespace(weight=torch.ones(1024, dtype=torch.bfloat16), eps=1e-6)
    with mock.patch.dict(os.environ, {"NANOVLLM_GEMV_PRELOAD": preload}):
        for n, k, silu, fused in ((1024, 3072, False, False), (3072, 1024, True, True), (4096, 1024, False, True)):
            w, x = _weights(n, k, silu)
            kw = dict(norm=norm, residual=torch.zeros_like(x), silu=silu) if fused else {}
            bias = torch.zeros(w.shape[0], dtype=torch.bfloat16) if n == 4096 else None
            for cfg in configs_for(n, k):
                _launch(x, w, cfg, bias=bias, **kw)
        w8 = torch.zeros(1024, 3072, dtype=torch.float8_e4m3fn)
        scale = torch.ones(1024, dtype=torch.float32)
        for cfg in configs_for(1024, 3072, gemv_configs(w8)):
            _launch(torch.zeros(1, 3072, dtype=torch.bfloat16), w8, cfg, scale=scale)
        if preload == "all":
            w, _ = _weights(1024, 2048, False)
            for m in (2, 4):
                for cfg in configs_for(1024, 2048, MULTI_CONFIGS[m]):
                    _launch(torch.zeros(m, 2048, dtype=torch.bfloat16), w, cfg)
    ptx = _named(sm90, "gemv_kernel")
    assert len(ptx) >= 10
    # PDL: every one-row kernel waits for the kernel before (griddepcontrol.wait).
    assert all("griddepcontrol.wait" in p for p in ptx)
    if preload == "all":
        assert _named(sm90, "gemv_multi_kernel")


def test_few_row_kernels_compile_for_sm90(sm90):
    """The few-row kernel (tensor cores, split-K): gate/up with the residual add, norm and SwiGLU at 32 token rows
    with its first K step preloaded and without, o at 3 rows (a 16-row tile), and FP8 weights and activations.
    One configuration each: each compile takes seconds, and the configurations differ only in tile sizes."""
    from engine.layers.gemv import FP8_ROWS_CONFIGS, ROWS_CONFIGS, _launch_rows

    norm = SimpleNamespace(weight=torch.ones(1024, dtype=torch.bfloat16), eps=1e-6)
    x = torch.zeros(32, 1024, dtype=torch.bfloat16)
    w = torch.zeros(2 * 3072, 1024, dtype=torch.bfloat16)
    for preload in ("all", "0"):
        with mock.patch.dict(os.environ, {"NANOVLLM_GEMV_PRELOAD": preload}):
            _launch_rows(x, w, ROWS_CONFIGS[1], norm=norm, residual=torch.zeros_like(x), silu=True)
    _launch_rows(torch.zeros(3, 2048, dtype=torch.bfloat16), torch.zeros(1024, 2048, dtype=torch.bfloat16),
                 ROWS_CONFIGS[0])  # fmt: skip
    w8, scale = torch.zeros(1024, 2048, dtype=torch.float8_e4m3fn), torch.ones(1024, dtype=torch.float32)
    x8, sx = torch.zeros(32, 2048, dtype=torch.float8_e4m3fn), torch.ones(32, 1, dtype=torch.float32)
    _launch_rows(x8, w8, FP8_ROWS_CONFIGS[32][1], scale=scale, x_scale=sx, out_dtype=torch.bfloat16)
    assert len(_named(sm90, "rows_kernel")) == 4


def test_attention_and_qk_kernels_compile_for_sm90(sm90):
    """The split-KV decode kernel plain, with the log-sum-exp (cascade), and fused with the q/k norm, rope and
    append (with its first page, none, or 2 or 4 pages preloaded, and the states cascade needs), at 1 and 8 rows and
    with the mean-context split; and the separate q/k norm + rope + append kernel."""
    from engine.attention.triton_decode import SplitDecode
    from engine.layers.fused_qkv import qk_norm_rope_append

    hq, hkv, d, bs, pages = 16, 8, 128, 64, 12
    cache = torch.zeros(pages, 2, hkv, bs, d, dtype=torch.bfloat16)
    cos_sin = torch.zeros(4096, d, dtype=torch.float32)
    qw, kw = torch.ones(d, dtype=torch.bfloat16), torch.ones(d, dtype=torch.bfloat16)
    for rows, mean_chunk in ((1, False), (8, False), (8, True)):
        kernel = SplitDecode(rows, hq, hkv, d, torch.device("cpu"), 132, mean_chunk=mean_chunk)
        indptr = torch.arange(rows + 1, dtype=torch.int32)
        indices = torch.zeros(rows, dtype=torch.int32)
        last = torch.ones(rows, dtype=torch.int32)
        q = torch.zeros(rows, hq, d, dtype=torch.bfloat16)
        kernel(q, cache, indptr, indices, last)
        kernel.with_lse(q, cache, indptr, indices, last)
        qkv = torch.zeros(rows, (hq + 2 * hkv) * d, dtype=torch.bfloat16)
        positions = torch.zeros(rows, dtype=torch.int64)
        for preload in ("1", "0", "2", "4"):
            with mock.patch.dict(os.environ, {"NANOVLLM_ATTN_PRELOAD": preload}):
                kernel.fused(qkv, qw, kw, 1e-6, cos_sin, positions, cache, indptr, indices, last)
                kernel.fused(qkv, None, None, 1e-6, cos_sin, positions, cache, indptr, indices, last, states=True)
    ptx = _named(sm90, "split_decode")
    assert len(ptx) >= 8
    assert all("griddepcontrol.wait" in p for p in ptx)
    t = 5
    qk_norm_rope_append(
        torch.zeros(t, (hq + 2 * hkv) * d, dtype=torch.bfloat16), hq, hkv, qw, kw, 1e-6, cos_sin,
        torch.zeros(t, dtype=torch.int64), torch.zeros(t, dtype=torch.int32), torch.zeros(t, dtype=torch.int32),
        torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32), cache,
    )  # fmt: skip
    assert _named(sm90, "qk_norm_rope_append")


def test_sampling_fp8_quantize_and_embedding_kernels_compile_for_sm90(sm90):
    """The sampling kernel (greedy, sampled) with the filter passes (top-k / top-p / min-p), the FP8 row
    quantization plain and with the residual add + RMSNorm, and the CUDA graphs' embedding kernel."""
    from engine.layers.embedding import embed_sampled
    from engine.layers.fp8 import add_rmsnorm_quantize, quantize_rows
    from engine.layers.sample import FusedSampler, sample_params

    sampler = FusedSampler(torch.device("cpu"))
    logits = torch.zeros(4, 151936, dtype=torch.bfloat16)
    sampler(logits)
    params = sample_params([1, 2, 3, 4], [0, 0, 0, 0], [0.7] * 4, [50] * 4, [0.9] * 4, [0.05] * 4)
    sampler(logits, params)
    sampler(logits, params, filtered=True)
    assert len(_named(sm90, "sample_kernel")) >= 3
    x = torch.zeros(32, 1024, dtype=torch.bfloat16)
    quantize_rows(x)
    add_rmsnorm_quantize(x, torch.zeros_like(x), torch.ones(1024, dtype=torch.bfloat16), 1e-6)
    assert _named(sm90, "quantize_kernel")
    rows = torch.zeros(3, dtype=torch.int64)
    embed_sampled(torch.zeros(151936, 1024, dtype=torch.bfloat16), rows, rows, rows)
    ptx = _named(sm90, "embed_rows")
    assert ptx and all("griddepcontrol.wait" in p for p in ptx)
