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


def test_shape_key_ignores_page_ids_and_sees_every_length():
    """A prefill graph skips plan() when shape_key() repeats: the same key for other pages, a new one for any change
    of query offsets, pages per row or lengths (each would change FlashInfer's schedule)."""
    staged = StagedTables(rows=3, max_pages=64, device=torch.device("cpu"))

    def key(tables, kv_lens, q_lens):
        rows = staged.fill(tables, kv_lens, 16)
        staged.fill_qo(q_lens)
        return staged.shape_key(rows)

    base = key([[1, 2, 3], [4]], [40, 9], [8, 1])
    assert key([[7, 8, 9], [5]], [40, 9], [8, 1]) == base  # other pages, same shape
    assert key([[1, 2, 3], [4]], [41, 9], [8, 1]) != base  # a length (the last page's fill)
    assert key([[1, 2, 3], [4, 5]], [40, 17], [8, 1]) != base  # a row gains a page
    assert key([[1, 2, 3], [4]], [40, 9], [7, 2]) != base  # the query split between rows
    assert key([[1, 2, 3], [4], [6]], [40, 9, 3], [8, 1, 1]) != base  # another row


def test_decode_twins_by_size_and_whole_kv_only_without_a_dominant_context(monkeypatch):
    """Unsplit twins exist for the tensor-core decode sizes that split, split-KV (Triton) twins for those that do
    not; a step takes the unsplit graph unless its longest context is both more than WHOLE_KV_MAX_OVER_MEAN times the
    mean and more than WHOLE_KV_MAX_SHARE of the step's KV tokens."""
    from engine.attention.flashinfer_backend import (
        TENSOR_CORE_DECODE_MIN_BATCH,
        WHOLE_KV_MAX_OVER_MEAN,
        WHOLE_KV_MAX_SHARE,
        no_split_decode_min_batch,
        skewed_variant_sizes,
        whole_kv_pays,
        whole_kv_variant_sizes,
    )

    sizes = [1, 2, 4, 8, 16, 32, 48, 64, 80]
    assert whole_kv_variant_sizes(sizes, 33) == [b for b in sizes if TENSOR_CORE_DECODE_MIN_BATCH <= b < 33] == [16, 32]
    assert whole_kv_variant_sizes(sizes, 0) == []  # always split: no twins
    assert skewed_variant_sizes(sizes, 33) == [48, 64, 80] and skewed_variant_sizes(sizes, 0) == []
    assert skewed_variant_sizes(sizes, 8) == [16, 32, 48, 64, 80]  # tensor-core sizes only
    monkeypatch.setenv("NANOVLLM_NO_SPLIT_DECODE_MIN_BATCH", "0")  # read before the device is asked
    assert no_split_decode_min_batch(None, 8) == 0
    assert whole_kv_pays([300] * 16) and whole_kv_pays([100, 120, 90, 110, 95, 105, 100])
    r = WHOLE_KV_MAX_OVER_MEAN
    edge = int(r * 1500 / (16 - r))  # the longest context 15 others of 100 tokens allow: at most r times the mean
    assert whole_kv_pays([edge] + [100] * 15) and not whole_kv_pays([edge + 1] + [100] * 15)
    assert not whole_kv_pays([8000] + [300] * 15)  # one long context among short ones
    # In a large batch the share of the step's KV tokens allows more than WHOLE_KV_MAX_OVER_MEAN times the mean.
    edge = int(WHOLE_KV_MAX_SHARE * 12700 / (1 - WHOLE_KV_MAX_SHARE))
    assert edge > r * 100 and whole_kv_pays([edge] + [100] * 127) and not whole_kv_pays([edge + 1] + [100] * 127)


def test_short_decode_rule_takes_the_triton_twin_by_mean_context(monkeypatch):
    """Steps of at most the row limit whose mean context is at most the token limit take the Triton twin, whatever
    their spread; 0 tokens turns it off, and a bad setting is named."""
    from engine.attention.flashinfer_backend import (
        SHORT_DECODE_MAX_ROWS,
        SHORT_DECODE_TOKENS,
        short_decode_limits,
        short_decode_pays,
    )

    for name in ("NANOVLLM_SHORT_DECODE_TOKENS", "NANOVLLM_SHORT_DECODE_MAX_ROWS"):
        monkeypatch.delenv(name, raising=False)
    assert short_decode_limits() == (SHORT_DECODE_TOKENS, SHORT_DECODE_MAX_ROWS)
    assert short_decode_pays([300] * 64, (300, 64)) and not short_decode_pays([301] + [300] * 63, (300, 64))
    assert short_decode_pays([8000] + [30] * 63, (200, 64))  # the mean (155) decides, not the longest
    assert not short_decode_pays([100] * 65, (200, 64))  # too many requests
    assert not short_decode_pays([100] * 64, (0, 64))
    monkeypatch.setenv("NANOVLLM_SHORT_DECODE_TOKENS", "0")
    monkeypatch.setenv("NANOVLLM_SHORT_DECODE_MAX_ROWS", "256")
    assert short_decode_limits() == (0, 256)
    monkeypatch.setenv("NANOVLLM_SHORT_DECODE_MAX_ROWS", "-1")
    with pytest.raises(ValueError, match="NANOVLLM_SHORT_DECODE_MAX_ROWS='-1'"):
        short_decode_limits()
    monkeypatch.setenv("NANOVLLM_SHORT_DECODE_TOKENS", "short")
    with pytest.raises(ValueError, match="NANOVLLM_SHORT_DECODE_TOKENS='short'"):
        short_decode_limits()


def test_short_rule_keeps_only_short_steps_where_the_twin_just_overfills_a_wave():
    """Where one program per request and KV head just overfills the SMs' first wave, the Triton twin keeps only the
    shortest steps: with 8 KV heads on 132 SMs that is the 96-request graph (768 programs; 80 make 640, 112 make 896),
    where it measured slower than FlashInfer's graph above a mean of 384 tokens. The band moves with SMs and heads."""
    from engine.attention.flashinfer_backend import (
        TWIN_PROGRAMS_PER_SM,
        WAVE_SHORT_DECODE_TOKENS,
        short_decode_pays,
        short_limits_at,
    )
    from engine.cuda_graphs import capture_sizes

    limits = (1024, 128)
    cut = [b for b in capture_sizes(256) if b >= 48 and short_limits_at(b, 8, 132, limits) != limits]
    assert cut == [96]
    assert short_limits_at(96, 8, 132, limits) == (WAVE_SHORT_DECODE_TOKENS, 128)
    at96 = short_limits_at(96, 8, 132, limits)
    assert short_decode_pays([256] * 90, at96) and not short_decode_pays([600] * 90, at96)
    assert short_decode_pays([600] * 90, short_limits_at(80, 8, 132, limits))
    # One program past what fits at once tips it; a lower limit stays; off (0 tokens) stays off.
    full = TWIN_PROGRAMS_PER_SM * 100
    assert short_limits_at(full // 4, 4, 100, limits) == limits
    assert short_limits_at(full // 4 + 1, 4, 100, limits)[0] == WAVE_SHORT_DECODE_TOKENS
    assert short_limits_at(96, 8, 132, (200, 128)) == (200, 128)
    assert short_limits_at(96, 8, 132, (0, 128)) == (0, 128)
    # A kernel that fits 8 programs per SM (the driver's count for head_dim 64) moves the band to 144 and 160.
    assert [b for b in capture_sizes(256) if b >= 48 and short_limits_at(b, 8, 132, limits, 8) != limits] == [144, 160]


def test_wave_cut_has_its_own_knob(monkeypatch):
    """NANOVLLM_WAVE_SHORT_DECODE_TOKENS sets the cut at wave sizes (an A/B there needs it: the general token limit
    cannot lift it); a bad value names the variable."""
    from engine.attention.flashinfer_backend import WAVE_SHORT_DECODE_TOKENS, short_limits_at, wave_short_tokens

    monkeypatch.delenv("NANOVLLM_WAVE_SHORT_DECODE_TOKENS", raising=False)
    assert wave_short_tokens() == WAVE_SHORT_DECODE_TOKENS
    monkeypatch.setenv("NANOVLLM_WAVE_SHORT_DECODE_TOKENS", "100000")
    lifted = short_limits_at(96, 8, 132, (1024, 128), wave_tokens=wave_short_tokens())
    assert lifted == (1024, 128) and short_limits_at(96, 8, 132, (1024, 128))[0] == WAVE_SHORT_DECODE_TOKENS
    monkeypatch.setenv("NANOVLLM_WAVE_SHORT_DECODE_TOKENS", "lots")
    with pytest.raises(ValueError, match="NANOVLLM_WAVE_SHORT_DECODE_TOKENS='lots'"):
        wave_short_tokens()


def test_resident_programs_is_none_without_a_driver_or_a_kernel():
    """Without the CUDA driver (CI) or a launched kernel the count is unknown, and the graph runner falls back to
    the measured TWIN_PROGRAMS_PER_SM."""
    from types import SimpleNamespace

    from engine.layers.kernels import resident_programs

    launched = SimpleNamespace(function=0, metadata=SimpleNamespace(num_warps=4, shared=0))
    assert resident_programs(launched) is None  # no libcuda here; on a GPU a null function is an error, also None
    assert resident_programs(object()) is None


def test_cascade_own_kernel_knob_names_the_bad_value(monkeypatch):
    from engine.attention.flashinfer_backend import cascade_own_kernel

    monkeypatch.delenv("NANOVLLM_CASCADE_OWN_KERNEL", raising=False)
    assert cascade_own_kernel() == "triton"
    monkeypatch.setenv("NANOVLLM_CASCADE_OWN_KERNEL", "flashinfer")
    assert cascade_own_kernel() == "flashinfer"
    monkeypatch.setenv("NANOVLLM_CASCADE_OWN_KERNEL", "cuda")
    with pytest.raises(ValueError, match="'cuda' is not one of"):
        cascade_own_kernel()
