"""RMSNorm, with an optional fused residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as HF transformers does."""

    def __init__(self, hidden_size: int, eps: float, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = fused

    def _torch_norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # torch's own op: the same result as the formula below in fp32, in one call instead of five (CPU path).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x; with residual, first add it and also return the sum as the new residual."""
        if self.fused:
            import flashinfer

            if residual is None and x.dim() == 3:
                # Per-head q/k norm on a strided view of the QKV output: FlashInfer reads the strides, no copy.
                return flashinfer.rmsnorm(x, self.weight, self.eps)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                return flashinfer.rmsnorm(x2, self.weight, self.eps).view(shape)
            r2 = residual.reshape(-1, shape[-1])
            # In place: x2 becomes the normalised value, r2 the running residual.
            flashinfer.fused_add_rmsnorm(x2, r2, self.weight, self.eps)
            return x2.view(shape), r2.view(shape)
        if residual is None:
            return self._torch_norm(x)
        residual = x + residual
        return self._torch_norm(residual), residual
