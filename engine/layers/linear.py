"""Linear layers whose weights are packed from several checkpoint tensors (QKV, gate/up)."""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """A linear layer made of named shards stacked on the output axis, each loaded separately."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (weight or bias) into its rows of the packed parameter."""
        offset, size = self.shard_offsets[shard]
        param = getattr(self, param_name)
        if tensor.shape[0] != size:
            raise ValueError(f"shard {shard} of {param_name} has {tensor.shape[0]} rows, expected {size}")
        with torch.no_grad():
            param[offset : offset + size].copy_(tensor)
