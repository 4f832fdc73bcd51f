"""The page tables CUDA-graph steps stage in pinned memory (StagedTables) equal the eager path's (PagedIndices)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.attention.flashinfer_backend import PagedIndices, StagedTables


@pytest.mark.parametrize("block_size,first_block", [(16, 0), (64, 0), (16, 2)])
def test_staged_tables_match_paged_indices(block_size, first_block):
    rng = random.Random(block_size + first_block)
    staged = StagedTables(rows=9, max_pages=9 * 40, device=torch.device("cpu"))
    for _ in range(20):  # refilled in place: nothing of an earlier, longer fill may show through
        rows = rng.randint(1, 9)
        kv_lens = [rng.randint(first_block * block_size + 1, 40 * block_size) for _ in range(rows)]
        tables = [rng.sample(range(1000), -(-n // block_size)) for n in kv_lens]
        indptr, indices, last = PagedIndices.build(tables, kv_lens, block_size, first_block)
        assert staged.fill(tables, kv_lens, block_size, first_block) == rows
        assert torch.equal(staged.indptr[: rows + 1], indptr)
        assert torch.equal(staged.indices[: int(indptr[-1])], indices)
        assert torch.equal(staged.last[:rows], last)
        # What FlashInfer's plan() would derive from indptr and last (flashinfer.page.get_seq_lens), given directly.
        pages = np.diff(staged.np[1][: rows + 1])
        assert ((pages - 1) * block_size + staged.np[2][:rows]).tolist() == staged.np[3][:rows].tolist()
        q_lens = [rng.randint(0, 50) for _ in range(rows)]
        staged.fill_qo(q_lens)
        assert staged.qo_indptr[: rows + 1].tolist() == [0, *np.cumsum(q_lens).tolist()]
