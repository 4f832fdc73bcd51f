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


def graph_time_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn, run reps times back-to-back in one CUDA graph (best of 3 replays): the
    kernels' own time, without launch gaps."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best


@torch.inference_mode()
def tune_weight_layouts(model: nn.Module) -> dict[tuple[int, int], str]:
    """Per linear weight shape, store it row-major or column-major, whichever cuBLAS runs faster for a decode
    step (M=1) without being slower for a prefill chunk (M=512). Returns {(out, in): "row" | "col"}.

    Why: for some shapes cuBLAS's M=1 kernel is much slower in one layout (Qwen3-0.6B o_proj, 1024x2048:
    12.4 us row-major vs 5.1 us column-major on an H200). F.linear takes either layout without a copy.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[0].weight.device.type != "cuda":
        return {}
    choice: dict[tuple[int, int], str] = {}
    for m in linears:
        shape = tuple(m.weight.shape)
        if shape in choice:
            continue
        w = m.weight.detach()
        w_col = w.t().contiguous().t()
        times = {}
        for rows in (1, 512):
            x = torch.randn(rows, shape[1], device=w.device, dtype=w.dtype)
            times[rows] = [graph_time_us(lambda w_=w_, x_=x: torch.nn.functional.linear(x_, w_)) for w_ in (w, w_col)]
        del w_col
        col_better = times[1][1] < 0.9 * times[1][0] and times[512][1] <= 1.1 * times[512][0]
        choice[shape] = "col" if col_better else "row"
    for m in linears:
        if choice[tuple(m.weight.shape)] == "col":
            m.weight.data = m.weight.data.t().contiguous().t()
    return choice
