"""The attention seam: a metadata object built once per step, and the interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's batch; tensors live on the model's device.

    Tokens of the step are laid out request after request; request i owns query tokens
    cu_seqlens_q[i]:cu_seqlens_q[i+1] and attends to the first kv_lens[i] positions of its blocks.
    """

    num_tokens: int
    num_reqs: int
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset where each new token's KV goes
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    cu_seqlens_q_cpu: torch.Tensor  # the same on the host (planners read it there without a device sync)
    kv_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    req_index: torch.Tensor  # [T] int64: which request each token belongs to
    q_lens_cpu: list[int]
    kv_lens_cpu: list[int]
    block_tables_cpu: list[list[int]]
    is_decode: bool  # every request has exactly one query token
    # Cascade: number of leading blocks shared by every request (0 = no cascade this step).
    shared_prefix_blocks: int = 0


class AttentionBackend:
    """Writes each layer's new K/V into the paged cache and attends over it."""

    name = "base"
    fused_qkv = False  # True: forward_qkv() takes the packed QKV projection (norm, rope and KV append in one kernel)

    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare per-step state once, before the layers run."""
        raise NotImplementedError

    def forward(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], kv_cache [num_blocks, 2, Hkv, block_size, D] -> out [T, Hq, D]."""
        raise NotImplementedError


def aligned_starts(sizes: list[int], element_size: int, align_bytes: int = 16) -> list[int]:
    """Element offsets that pack parts of these sizes one after another, each starting align_bytes-aligned.

    Why: Triton specialises kernels on pointer alignment, so a part at an odd offset would compile another variant
    of a kernel mid-run (hundreds of milliseconds).
    """
    align = max(1, align_bytes // element_size)
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + -(-n // align) * align)
    return starts


def _stage(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # One pinned buffer holding the tensors (each start aligned), and the host views of them in it.
    sizes = [t.numel() for t in tensors]
    starts = aligned_starts(sizes, tensors[0].element_size())
    staged = torch.empty(starts[-1] + sizes[-1], dtype=tensors[0].dtype, pin_memory=True)
    for start, n, t in zip(starts, sizes, tensors):
        staged[start : start + n] = t.reshape(-1)
    return staged, [staged[start : start + n].view(t.shape) for start, n, t in zip(starts, sizes, tensors)]


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors of one dtype on the device, through one pinned buffer and one copy (as they are on the CPU).

    Why: a copy from pageable memory may wait for the work already queued on the stream (the CUDA driver stages
    it), which stalls the host while the previous step still runs; a pinned copy is queued without waiting. The
    same holds inside FlashInfer's plan(): page indices handed to it on the host are copied with a blocking copy,
    so callers pass them through here first.
    """
    if device.type != "cuda":
        return tensors
    staged, views = _stage(tensors)
    on_device = staged.to(device, non_blocking=True)
    return [on_device[v.storage_offset() : v.storage_offset() + v.numel()].view(v.shape) for v in views]


def pin_host(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors of one dtype copied into one pinned buffer (views of it), for a CUDA device; as they are else.

    Why: FlashInfer's eager plan() reads its offsets and lengths on the host and then copies them to the device;
    from pageable memory that copy may wait for the work queued on the stream (see to_device), so the host could not
    plan a large prefill step while the previous one runs."""
    if device.type != "cuda":
        return tensors
    return _stage(tensors)[1]


def kv_write_index(slot_mapping: torch.Tensor, num_kv_heads: int, block_size: int) -> torch.Tensor:
    """Rows of the cache viewed as [-1, head_dim] where each new token's keys (all heads), then values, go.

    HND: row ((block * 2 + k_or_v) * num_kv_heads + head) * block_size + offset.
    """
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    heads = torch.arange(num_kv_heads, device=slot_mapping.device)
    k_rows = ((blocks * 2 * num_kv_heads).unsqueeze(1) + heads) * block_size + offsets.unsqueeze(1)
    return torch.cat([k_rows.flatten(), k_rows.flatten() + num_kv_heads * block_size])


def write_kv(kv_cache: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys and values [T, Hkv, D] at the rows kv_write_index() gave, in the HND paged layout."""
    dim = kv_cache.shape[-1]
    # One index_copy_ over a flat view: 3-4x faster on the CPU than two advanced-index assignments.
    kv_cache.view(-1, dim).index_copy_(0, index, torch.cat([k.reshape(-1, dim), v.reshape(-1, dim)]))
