"""The old engine's scar: writer and reader disagreeing on the KV layout (NHD vs HND)."""

from __future__ import annotations

import torch

from engine.attention.base import kv_write_index, write_kv


def test_write_kv_uses_the_hnd_layout_the_readers_expect():
    num_blocks, heads, block_size, dim = 4, 3, 8, 5
    cache = torch.full((num_blocks, 2, heads, block_size, dim), float("nan"))
    slots = torch.tensor([0, 9, 31])  # block 0 offset 0, block 1 offset 1, block 3 offset 7
    k = torch.randn(3, heads, dim)
    v = torch.randn(3, heads, dim)
    write_kv(cache, kv_write_index(slots, heads, block_size), k, v)
    for i, (b, o) in enumerate([(0, 0), (1, 1), (3, 7)]):
        # HND: [block, k/v, head, offset, dim]. An NHD writer would have put head and offset the other way round.
        assert torch.equal(cache[b, 0, :, o, :], k[i])
        assert torch.equal(cache[b, 1, :, o, :], v[i])
    assert int((~cache.isnan()).sum()) == 2 * 3 * heads * dim  # nothing else was written


def test_engine_cache_is_allocated_hnd(qwen3_llm):
    runner = qwen3_llm.runner
    layer = runner.kv_cache[0]
    assert layer.shape[1:] == (2, runner.num_kv_heads, runner.block_size, runner.head_dim)
