"""The embedding lookup of a CUDA-graph step, taking each row's token from the step before where that one sampled it.

Why: the engine launches a step before it collects the one in flight, so a decoding request's input token is that
step's sample, still on the device. Outside the graph, three operations patched it into the graph's input ids before
each replay (a pinned copy of the row indices, an index_select and an index_copy), on the device's critical path.
Here the graph's first kernel reads each row's token from the sampler's token buffer where the step's inputs name a
row of it, else from the input ids, and gathers that token's embedding row. Launched with PDL, it also lets the
first projection load its weights while it runs.
"""

from __future__ import annotations

import functools

import torch

from engine.layers.kernels import launch_options, triton_available


def embedding_kernel_supported(weight: torch.Tensor) -> bool:
    """Whether the kernel serves this embedding: Triton importable and the weight on a CUDA device, rows contiguous."""
    return triton_available() and weight.is_cuda and weight.stride(1) == 1


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def embed_rows(ids_ptr, src_ptr, sampled_ptr, weight_ptr, out_ptr, hidden, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()  # the next projection may load its weights now
            tl.extra.cuda.gdc_wait()
        token = tl.load(ids_ptr + row)
        src = tl.load(src_ptr + row)
        if src >= 0:
            token = tl.load(sampled_ptr + src)
        cols = tl.arange(0, BLOCK)
        for start in range(0, hidden, BLOCK):
            c = start + cols
            values = tl.load(weight_ptr + token * hidden + c, mask=c < hidden)
            tl.store(out_ptr + row * hidden + c, values, mask=c < hidden)

    return embed_rows


def embed_sampled(weight: torch.Tensor, ids: torch.Tensor, src: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """Embedding rows [T, hidden] of weight for T token rows: row i's token is sampled[src[i]] where src[i] >= 0,
    else ids[i] (ids, src and sampled int64 on the weight's device)."""
    rows, hidden = ids.shape[0], weight.shape[1]
    out = torch.empty(rows, hidden, dtype=weight.dtype, device=weight.device)
    if rows == 0:
        return out
    launch = launch_options(weight.device)
    block = min(4096, 1 << (hidden - 1).bit_length())
    kernel = _build_kernel()
    kernel[(rows,)](ids, src, sampled, weight, out, hidden, BLOCK=block, PDL=bool(launch), num_warps=4, **launch)
    return out
