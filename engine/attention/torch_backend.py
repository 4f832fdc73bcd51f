"""Reference attention in plain torch over the paged cache; runs on CPU and CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, AttentionMetadata, slot_coordinates, write_kv


class TorchAttentionBackend(AttentionBackend):
    """Gathers each request's blocks into a padded batch and calls scaled_dot_product_attention."""

    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.meta: AttentionMetadata | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        """Build the gather indices and the causal mask shared by all layers of this step."""
        self.meta = meta
        self.coords = None
        device = meta.positions.device
        max_q = max(meta.q_lens_cpu)
        max_kv = max(meta.kv_lens_cpu)
        self.max_q = max_q
        self.token_index = torch.arange(meta.num_tokens, device=device) - meta.cu_seqlens_q[:-1].long()[meta.req_index]
        # Query i of request b sits at position kv_len[b] - q_len[b] + i and sees keys up to that position.
        q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()
        q_pos = (meta.kv_lens.long() - q_lens).unsqueeze(1) + torch.arange(max_q, device=device).unsqueeze(0)
        k_pos = torch.arange(max_kv, device=device)
        self.max_kv = max_kv
        self.is_causal = False
        if meta.is_decode and min(meta.kv_lens_cpu) == max_kv:
            self.mask = None  # every query sees every key: SDPA takes its fast unmasked path
        elif meta.num_reqs == 1 and meta.q_lens_cpu[0] == max_kv:
            self.mask, self.is_causal = None, True  # a plain causal prefill
        else:
            self.mask = (k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, max_q, max_kv]

    def forward(self, layer_id, q, k, v, kv_cache):
        """Write this step's K/V, then attend each query to its request's cached keys."""
        meta = self.meta
        block_size = kv_cache.shape[3]
        if self.coords is None:  # same for every layer of the step
            self.coords = slot_coordinates(meta.slot_mapping, block_size)
        write_kv(kv_cache, self.coords, k, v)
        num_blocks = -(-self.max_kv // block_size)
        tables = meta.block_tables[:, :num_blocks].long()
        b = meta.num_reqs
        # [B, nb, 2, H, bs, D] -> [B, H, nb*bs, D]
        kv = kv_cache[tables]
        keys = kv[:, :, 0].permute(0, 2, 1, 3, 4).reshape(b, self.num_kv_heads, -1, self.head_dim)[:, :, : self.max_kv]
        values = (
            kv[:, :, 1].permute(0, 2, 1, 3, 4).reshape(b, self.num_kv_heads, -1, self.head_dim)[:, :, : self.max_kv]
        )
        if meta.is_decode:
            queries = q.view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            padded = q.new_zeros(b, self.max_q, self.num_heads, self.head_dim)
            padded[meta.req_index, self.token_index] = q
            queries = padded.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=self.mask,
            is_causal=self.is_causal,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        out = out.transpose(1, 2)  # [B, max_q, H, D]
        if meta.is_decode:
            return out.reshape(b, self.num_heads, self.head_dim)
        return out[meta.req_index, self.token_index]
