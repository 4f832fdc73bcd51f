"""SwiGLU activation over a packed gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input holds gate then up on its last axis."""

    def __init__(self, fused: bool = False):
        super().__init__()
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated activation."""
        if self.fused:
            import flashinfer

            return flashinfer.silu_and_mul(x)
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
