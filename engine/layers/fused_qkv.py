"""One Triton kernel for the work between the QKV GEMM and attention: per-head q/k RMSNorm (Qwen3), NeoX rope, and
the K/V append into the paged HND cache.

Why: unfused, that is four launches per layer (q norm, k norm, rope, append; three without q/k norm), each a tiny
kernel whose cost is mostly launch latency inside a CUDA graph (~1.5-3.5 us each on an H100, docs/benchmarks.md).
No library kernel covers it for these head counts: FlashInfer's fused q/k-norm + rope + append
(`cake_fused_qk_rmsnorm_rope_append_paged_kv_cache`) takes only 8/1 and 64/8 heads and the NHD layout.
The unfused FlashInfer path stays the reference (NANOVLLM_FUSED_QKV=0 selects it; tests compare the two).
"""

from __future__ import annotations

import functools
import os

import torch

from engine.layers.kernels import launch_options, triton_available


def fused_qkv_available(head_dim: int) -> bool:
    """Whether the fused kernel can run: Triton importable, CUDA, head_dim a power of two, not switched off."""
    if os.environ.get("NANOVLLM_FUSED_QKV", "1") == "0":
        return False
    if not triton_available() or not torch.cuda.is_available():
        return False
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def qk_norm_rope_append(
        qkv_ptr,
        stride_t,
        q_out_ptr,
        q_w_ptr,
        k_w_ptr,
        cos_sin_ptr,
        rope_pos_ptr,
        batch_idx_ptr,
        append_pos_ptr,
        kv_indptr_ptr,
        kv_indices_ptr,
        cache_ptr,
        eps,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_H: tl.constexpr,
        NORM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # One program per token, all its q and k heads as rows of one tile (the per-token page lookup happens
        # once); k rows also move their head's V.
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # the QKV projection's output is ready
        t = tl.program_id(0).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)
        half = tl.arange(0, D // 2)
        is_q = heads < HQ
        is_k = (heads >= HQ) & (heads < HQ + HKV)
        row = qkv_ptr + t * stride_t
        offs = heads[:, None] * D + half[None, :]
        live = (is_q | is_k)[:, None]
        x1 = tl.load(row + offs, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(row + offs + D // 2, mask=live, other=0.0).to(tl.float32)
        if NORM:
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / D + eps)[:, None]
            q1 = tl.load(q_w_ptr + half).to(tl.float32)[None, :]
            q2 = tl.load(q_w_ptr + D // 2 + half).to(tl.float32)[None, :]
            k1 = tl.load(k_w_ptr + half).to(tl.float32)[None, :]
            k2 = tl.load(k_w_ptr + D // 2 + half).to(tl.float32)[None, :]
            x1 = x1 * r * tl.where(is_q[:, None], q1, k1)
            x2 = x2 * r * tl.where(is_q[:, None], q2, k2)
        pos = tl.load(rope_pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * D + half)[None, :]
        sin = tl.load(cos_sin_ptr + pos * D + D // 2 + half)[None, :]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        q_dst = q_out_ptr + t * (HQ * D) + offs
        tl.store(q_dst, o1.to(q_out_ptr.dtype.element_ty), mask=is_q[:, None])
        tl.store(q_dst + D // 2, o2.to(q_out_ptr.dtype.element_ty), mask=is_q[:, None])
        b = tl.load(batch_idx_ptr + t)
        p = tl.load(append_pos_ptr + t)
        page = tl.load(kv_indices_ptr + tl.load(kv_indptr_ptr + b) + p // BS).to(tl.int64)
        # HND page: [2, HKV, BS, D]; K at index 0, V at index 1. Rows of q heads compute a negative kv head
        # here, but their stores are masked off.
        kh = heads - HQ
        k_rows = cache_ptr + ((page * 2 * HKV + kh) * BS + p % BS) * D
        k_mask = is_k[:, None]
        tl.store(k_rows[:, None] + half[None, :], o1.to(cache_ptr.dtype.element_ty), mask=k_mask)
        tl.store(k_rows[:, None] + D // 2 + half[None, :], o2.to(cache_ptr.dtype.element_ty), mask=k_mask)
        full = tl.arange(0, D)
        v = tl.load(row + (heads + HKV)[:, None] * D + full[None, :], mask=k_mask)
        tl.store(k_rows[:, None] + HKV * BS * D + full[None, :], v, mask=k_mask)

    return qk_norm_rope_append


def qk_norm_rope_append(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos_sin: torch.Tensor,
    rope_positions: torch.Tensor,
    batch_indices: torch.Tensor,
    append_positions: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_cache: torch.Tensor,
) -> torch.Tensor:
    """From the QKV projection [T, (Hq + 2 Hkv) * D]: normalise (when weights are given) and rotate q and k, append
    k and v at (batch_indices, append_positions) of the paged cache [pages, 2, Hkv, page_size, D] whose page table
    is (kv_indptr, kv_indices), and return q [T, Hq, D]."""
    import triton

    kernel = _build_kernel()
    t = qkv.shape[0]
    d = kv_cache.shape[-1]
    q = torch.empty(t, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    norm = q_norm_weight is not None
    launch = launch_options(qkv.device)  # launch_pdl where PDL is on; the kernel then waits (PDL=True)
    kernel[(t,)](
        qkv,
        qkv.stride(0),
        q,
        q_norm_weight if norm else cos_sin,
        k_norm_weight if norm else cos_sin,
        cos_sin,
        rope_positions,
        batch_indices,
        append_positions,
        kv_indptr,
        kv_indices,
        kv_cache,
        eps,
        HQ=num_heads,
        HKV=num_kv_heads,
        D=d,
        BS=kv_cache.shape[3],
        BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads),  # Triton tiles are powers of two
        NORM=norm,
        PDL=bool(launch),
        num_warps=4,
        **launch,
    )
    return q
