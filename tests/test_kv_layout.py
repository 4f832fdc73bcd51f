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
    # block_size=None resolves per backend (64 on FlashInfer); the torch path's pages are 16 tokens.
    assert qwen3_llm.config.block_size == runner.block_size == qwen3_llm.engine.block_manager.block_size == 16


def test_torch_reader_gathers_each_requests_pages_in_hnd_order():
    from types import SimpleNamespace

    from engine.attention.torch_backend import TorchAttentionBackend

    num_blocks, heads, block_size, dim = 6, 2, 4, 3
    # Every element names where it lives: block, k/v, head, offset.
    b_, kv_, h_, o_ = torch.meshgrid(
        torch.arange(num_blocks), torch.arange(2), torch.arange(heads), torch.arange(block_size), indexing="ij"
    )
    code = (b_ * 1000 + kv_ * 100 + h_ * 10 + o_).float()
    cache = code.unsqueeze(-1).expand(-1, -1, -1, -1, dim).contiguous()
    tables = torch.tensor([[5, 1, 0], [2, 4, 0]], dtype=torch.int32)  # request 1 holds only two pages
    backend = TorchAttentionBackend(num_heads=4, num_kv_heads=heads, head_dim=dim, scale=1.0)
    backend.meta = SimpleNamespace(block_tables=tables, num_reqs=2)
    backend.max_kv = 10  # request 0: 10 tokens over 3 pages
    rows = cache.view(-1, block_size, dim).index_select(0, backend._gather_index(block_size))
    kv = rows.view(2, 2, heads, backend.num_blocks * block_size, dim)
    for kind in range(2):
        for req in range(2):
            for head in range(heads):
                for pos in range(8):
                    block = int(tables[req, pos // block_size])
                    expected = block * 1000 + kind * 100 + head * 10 + pos % block_size
                    assert kv[kind, req, head, pos, 0].item() == expected


def test_staged_parts_start_aligned_and_do_not_overlap():
    from engine.attention.base import aligned_starts

    for element_size in (4, 8):
        sizes = [3, 1, 16, 5, 2]
        starts = aligned_starts(sizes, element_size)
        assert starts[0] == 0
        for (start, n), nxt in zip(zip(starts, sizes), starts[1:]):
            assert (start * element_size) % 16 == 0 and (nxt * element_size) % 16 == 0
            assert start + n <= nxt < start + n + 16 // element_size  # no overlap, padding below one alignment
