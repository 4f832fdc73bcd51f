"""Rotary position embedding with the scaling a config declares (via transformers' rope functions)."""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's rope type."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    if rope_type == "default":
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: default, {sorted(ROPE_INIT_FUNCTIONS)}")
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv.float(), float(scale)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX style half rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k from a precomputed cos/sin table indexed by position."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, fused: bool = False):
        super().__init__()
        self.hf_config = hf_config
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.fused = fused
        # Filled by reset_cache once the model is on its device (construction happens on the meta device).
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self._cached: tuple | None = None  # (positions, cos, sin) of the current forward pass

    def _table(self, device) -> torch.Tensor:
        # FlashInfer wants [max_pos, head_dim]: the cos half then the sin half, in fp32.
        inv_freq, scale = rope_inv_freq(self.hf_config, self.head_dim)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
        return torch.cat((freqs.cos() * scale, freqs.sin() * scale), -1).to(device)

    def reset_cache(self, device) -> None:
        """Rebuild the table in fp32 on device (after the model was materialised from the meta device)."""
        self.cos_sin_cache = self._table(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate q [T, Hq, D] and k [T, Hkv, D] by their positions."""
        if self.fused:
            import flashinfer

            q2, k2 = q.reshape(q.shape[0], -1), k.reshape(k.shape[0], -1)
            flashinfer.apply_rope_with_cos_sin_cache_inplace(
                positions, q2, k2, self.head_dim, self.cos_sin_cache, is_neox=True
            )
            return q2.view_as(q), k2.view_as(k)
        # Every layer rotates by the same positions: build cos/sin once per forward pass.
        if self._cached is None or self._cached[0] is not positions or self._cached[1].dtype != q.dtype:
            cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)
            cos = torch.cat((cos, cos), -1).unsqueeze(1).to(q.dtype)
            sin = torch.cat((sin, sin), -1).unsqueeze(1).to(q.dtype)
            self._cached = (positions, cos, sin)
        _, cos, sin = self._cached
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
