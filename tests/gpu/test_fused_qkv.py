"""The fused q/k norm + rope + K/V append kernel writes exactly what FlashInfer's four separate kernels write."""

from __future__ import annotations

import pytest
import torch

from engine.layers.fused_qkv import fused_qkv_available, qk_norm_rope_append


@pytest.mark.parametrize("heads,kv_heads,head_dim,norm", [(16, 8, 128, True), (32, 8, 64, False), (8, 8, 128, True)])
def test_fused_kernel_matches_flashinfer_kernels(heads, kv_heads, head_dim, norm):
    import flashinfer

    assert fused_qkv_available(head_dim)
    torch.manual_seed(0)
    dev, dt, page = "cuda", torch.bfloat16, 16
    # Four requests: a long prefill chunk, two decode rows, and a padding row aimed at the scratch page (the last
    # one), as CUDA-graph steps have. Append positions are relative to each row's own pages (cascade's layout).
    q_lens, kv_lens = [37, 1, 1, 1], [37, 70, 16, 1]
    tables = [[3, 9, 4], [0, 5, 7, 2, 8], [6], [10]]
    t = sum(q_lens)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dt)
    qw = torch.randn(head_dim, device=dev, dtype=dt) if norm else None
    kw = torch.randn(head_dim, device=dev, dtype=dt) if norm else None
    pos = torch.cat([torch.arange(n - q, n) for q, n in zip(q_lens, kv_lens)])
    rope_pos = (pos + 1000).to(dev)  # rope positions differ from append positions under cascade
    batch = torch.cat([torch.full((q,), i) for i, q in enumerate(q_lens)]).to(dev, torch.int32)
    indptr = torch.tensor([0, 3, 8, 9, 10], device=dev, dtype=torch.int32)
    indices = torch.tensor(sum(tables, []), device=dev, dtype=torch.int32)
    last = torch.tensor([(n - 1) % page + 1 for n in kv_lens], device=dev, dtype=torch.int32)
    inv = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(4096, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(dev)

    cache = torch.zeros(11, 2, kv_heads, page, head_dim, device=dev, dtype=dt)
    q = qk_norm_rope_append(
        qkv, heads, kv_heads, qw, kw, 1e-6, cos_sin, rope_pos, batch, pos.to(dev, torch.int32), indptr, indices, cache
    )

    ref_cache = torch.zeros_like(cache)
    qr, kr, vr = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    qr, kr = qr.reshape(t, heads, head_dim), kr.reshape(t, kv_heads, head_dim)
    if norm:
        qr, kr = flashinfer.rmsnorm(qr, qw, 1e-6), flashinfer.rmsnorm(kr, kw, 1e-6)
    q2, k2 = qr.reshape(t, -1).contiguous(), kr.reshape(t, -1).contiguous()
    flashinfer.apply_rope_with_cos_sin_cache_inplace(rope_pos, q2, k2, head_dim, cos_sin, is_neox=True)
    flashinfer.page.append_paged_kv_cache(
        k2.view(t, kv_heads, head_dim), vr.reshape(t, kv_heads, head_dim), batch, pos.to(dev, torch.int32),
        ref_cache, indices, indptr, last, kv_layout="HND",
    )  # fmt: skip

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    # The unfused path rounds to bf16 between norm and rope; the fused kernel stays in fp32 until the store.
    assert rel(q, q2.view(t, heads, head_dim)) < 1e-2
    assert rel(cache[:, 0], ref_cache[:, 0]) < 1e-2
    assert torch.equal(cache[:, 1], ref_cache[:, 1])  # V is copied, not computed
    written = ref_cache.abs().sum(dim=(1, 2, 4)) > 0
    assert torch.equal(cache.abs().sum(dim=(1, 2, 4)) > 0, written)  # the same slots, nothing else
