"""Checks of the engine's Triton kernels against torch (the split-KV decode kernel, the GEMVs, the sampling kernels
and the CUDA graphs' embedding lookup), for any device and dtype: the GPU tests run them in bf16 on CUDA, and
tests/test_triton_interpreted.py in float32 on the CPU through Triton's interpreter."""

from __future__ import annotations

import math
import os
from unittest import mock

import torch

from engine.attention.triton_decode import SplitDecode


def paged(lens, hkv, d, bs, pages_total, g, device="cuda", dtype=torch.bfloat16):
    """A random HND cache and a shuffled page table holding sequences of the given lengths."""
    cache = torch.randn(pages_total, 2, hkv, bs, d, device=device, generator=g).to(dtype)
    free = torch.randperm(pages_total, device=device, generator=g).tolist()
    indptr, indices, last = [0], [], []
    for n in lens:
        pages = -(-n // bs)
        indices += free[:pages]
        free = free[pages:]
        indptr.append(indptr[-1] + pages)
        last.append(n - (pages - 1) * bs)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return cache, as_i32(indptr), as_i32(indices), as_i32(last)


def num_sms(device) -> int:
    """The multiprocessor count the kernel sizes its splits by (an H100's on the CPU)."""
    return torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132


def check_split_decode(
    lens, hq, hkv, d, bs, min_pages, one_split, mean_chunk=False, device="cuda", dtype=torch.bfloat16
):
    """The kernel's output, and its base-2 log-sum-exp (cascade's state), against attention in torch; mean_chunk:
    no split shorter than the batch's mean context."""
    g = torch.Generator(device=device).manual_seed(sum(lens))
    pages_total = sum(-(-n // bs) for n in lens) + 8
    cache, indptr, indices, last = paged(lens, hkv, d, bs, pages_total, g, device, dtype)
    q = torch.randn(len(lens), hq, d, device=device, generator=g).to(dtype)
    kernel = SplitDecode(len(lens), hq, hkv, d, device, num_sms(device), mean_chunk=mean_chunk)
    kernel.min_pages = min_pages
    kernel.one_split_pages = one_split
    # The second launch checks that the arrival counters were reset; it also returns the log-sum-exp (cascade).
    for launch in range(2):
        if launch == 0:
            out, lse = kernel(q, cache, indptr, indices, last), None
        else:
            out, lse = kernel.with_lse(q, cache, indptr, indices, last)
        for b, n in enumerate(lens):
            pages = indices[indptr[b] : indptr[b + 1]].long()
            k = cache[pages, 0].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
            v = cache[pages, 1].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
            qb = q[b].float().view(hkv, hq // hkv, d)
            scores = qb @ k.transpose(1, 2) / math.sqrt(d)
            ref = (torch.softmax(scores, -1) @ v).reshape(hq, d)
            err = ((out[b].float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"row {b} ({n} tokens): relative error {err:.2e}"
            if lse is not None:  # base 2, as FlashInfer's merge_state_in_place takes it
                ref_lse = (torch.logsumexp(scores, -1) / math.log(2)).reshape(hq)
                worst = (lse[b] - ref_lse).abs().max().item()
                assert worst < 1e-2, f"row {b} ({n} tokens): log-sum-exp off by {worst:.2e}"
    assert not kernel.counter.any()


def check_fused_split_decode(
    lens, hq, hkv, d, bs, norm, min_pages, one_split, mean_chunk=False, preload="1", device="cuda",
    dtype=torch.bfloat16,
):  # fmt: skip
    """q/k norm + rope + K/V append folded into the attention kernel: the same output and cache as the fused q/k
    kernel followed by the attention kernel, and nothing written but each row's new slot. preload "1" (the engine's
    default below 8 rows; "2" from 8): each split's first page (two pages) is loaded before the PDL wait, and so
    before the new slot is written."""
    with mock.patch.dict(os.environ, {"NANOVLLM_ATTN_PRELOAD": preload}):  # read at each launch
        _check_fused_split_decode(lens, hq, hkv, d, bs, norm, min_pages, one_split, mean_chunk, device, dtype)


def _check_fused_split_decode(lens, hq, hkv, d, bs, norm, min_pages, one_split, mean_chunk, device, dtype):
    from engine.layers.fused_qkv import qk_norm_rope_append

    g = torch.Generator(device=device).manual_seed(len(lens) + sum(lens))
    pages_total = sum(-(-n // bs) for n in lens) + 8
    cache, indptr, indices, last = paged(lens, hkv, d, bs, pages_total, g, device, dtype)
    rows = len(lens)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, device=device, generator=g).to(dtype)
    qw = (1 + 0.3 * torch.randn(d, device=device, generator=g)).to(dtype) if norm else None
    kw = (1 + 0.3 * torch.randn(d, device=device, generator=g)).to(dtype) if norm else None
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(8192, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(device)
    positions = torch.tensor([n - 1 for n in lens], device=device)  # int64, as the graph's input rows are
    kernel = SplitDecode(rows, hq, hkv, d, device, num_sms(device), mean_chunk=mean_chunk)
    kernel.min_pages = min_pages
    kernel.one_split_pages = one_split

    ref_cache = cache.clone()
    q = qk_norm_rope_append(
        qkv, hq, hkv, qw, kw, 1e-6, cos_sin, positions, torch.arange(rows, device=device, dtype=torch.int32),
        positions.to(torch.int32), indptr, indices, ref_cache,
    )  # fmt: skip
    ref, ref_lse = kernel.with_lse(q, ref_cache, indptr, indices, last)
    before = cache.clone()
    # The second launch checks that the arrival counters were reset; it also returns the states cascade merges.
    for launch in range(2):
        args = (qkv, qw, kw, 1e-6, cos_sin, positions, cache, indptr, indices, last.long())
        out, lse, q_out = kernel.fused(*args, states=True) if launch else (kernel.fused(*args), None, None)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, f"relative error {err:.2e} against the separate kernels"
        if launch:  # the normed, rotated q the shared level attends with, and the log-sum-exp
            q_err = ((q_out.float() - q.float()).norm() / q.float().norm()).item()
            assert q_err < 1e-2, f"rotated q: relative error {q_err:.2e}"
            assert (lse - ref_lse).abs().max().item() < 5e-2
    assert not kernel.counter.any()
    # K (computed: within rounding of the other kernel's) and V (copied: exact) at each row's new slot only.
    changed = (cache != before).any(dim=-1)  # [pages, 2, Hkv, BS]
    expected = torch.zeros_like(changed)
    for b, n in enumerate(lens):
        page = indices[indptr[b] + (n - 1) // bs]
        expected[page, :, :, (n - 1) % bs] = True
    assert torch.equal(changed | expected, expected), "the kernel wrote outside the rows' new slots"
    k_err = ((cache[:, 0].float() - ref_cache[:, 0].float()).norm() / ref_cache[:, 0].float().norm()).item()
    assert k_err < 1e-3
    assert torch.equal(cache[:, 1], ref_cache[:, 1])


def check_mean_chunk_splits(device="cuda", dtype=torch.bfloat16):
    """With mean_chunk, contexts up to the batch's mean take one program per KV head (no partial states) and a long
    one still splits; without it the short ones split too. Partial maxima start as NaN to show which were written."""
    lens, hq, hkv, d, bs = [40, 40, 40, 300], 4, 2, 32, 16  # 3, 3, 3 and 19 pages: a mean of 7
    g = torch.Generator(device=device).manual_seed(7)
    cache, indptr, indices, last = paged(lens, hkv, d, bs, 40, g, device, dtype)
    q = torch.randn(len(lens), hq, d, device=device, generator=g).to(dtype)
    written = {}
    for mean_chunk in (False, True):
        kernel = SplitDecode(len(lens), hq, hkv, d, device, num_sms(device), mean_chunk=mean_chunk)
        assert kernel.splits >= 4  # enough for the short contexts to split without mean_chunk
        kernel.part_m.fill_(float("nan"))
        ref = SplitDecode(len(lens), hq, hkv, d, device, num_sms(device))(q, cache, indptr, indices, last)
        out = kernel(q, cache, indptr, indices, last)
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
        per_row = (~kernel.part_m.isnan()).view(len(lens), -1).sum(1).tolist()
        written[mean_chunk] = per_row
    assert all(n > 0 for n in written[False]), written  # every row split
    assert written[True][:3] == [0, 0, 0] and written[True][3] > 0, written  # only the long row split


def check_resident_programs(hq, hkv, d, device="cuda", dtype=torch.bfloat16):
    """The driver's count of the split-KV kernel's programs resident on one SM, as launched, is what its registers
    (65,536 per SM, allocated per warp in units of 256), shared memory (1 KiB reserved per program) and threads
    allow: so resident_per_sm queries the kernel actually launched, with its real block size and shared memory."""
    lens, bs = [300, 70], 64
    g = torch.Generator(device=device).manual_seed(3)
    cache, indptr, indices, last = paged(lens, hkv, d, bs, 12, g, device, dtype)
    kernel = SplitDecode(len(lens), hq, hkv, d, device, num_sms(device))
    assert kernel.resident_per_sm() is None  # nothing launched yet
    kernel(torch.randn(len(lens), hq, d, device=device, generator=g).to(dtype), cache, indptr, indices, last)
    c, props = kernel.compiled, torch.cuda.get_device_properties(device)
    warps = c.metadata.num_warps
    by_regs = 65536 // (-(-c.n_regs * 32 // 256) * 256) // warps
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    by_shared = props.shared_memory_per_multiprocessor // (c.metadata.shared + 1024)
    assert kernel.resident_per_sm() == min(by_regs, by_threads, by_shared), (c.n_regs, c.metadata.shared, warps)


def check_fp8_rows(m, n, k, norm, silu, bias, device="cuda", dtype=torch.bfloat16):
    """The one-row GEMV (m=1) or the few-row kernel on an FP8 weight with row scales, in every configuration for m
    token rows (the norm, residual add and SwiGLU fused only up to MAX_ROWS rows, as the engine runs it), against
    the same computation in torch on the weight FP8 stands for."""
    from types import SimpleNamespace

    from engine.layers.fp8 import FP8_ROWS_CONFIGS, dequantize_fp8, quantize_fp8
    from engine.layers.gemv import (
        MAX_ROWS,
        _launch,
        _launch_rows,
        configs_for,
        gemv_configs,
        reference_gemv,
        rows_configs_for,
        rows_tile,
    )

    assert m <= MAX_ROWS or not (norm or silu), "the engine fuses the norm and SwiGLU at up to MAX_ROWS rows only"
    g = torch.Generator(device=device).manual_seed(m + n + k)
    rows = 2 * n if silu else n
    w8, scale = quantize_fp8(torch.randn(rows, k, device=device, generator=g) / k**0.5)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    r = torch.randn(m, k, device=device, generator=g).to(dtype) if norm else None
    nw = (1 + 0.1 * torch.randn(k, device=device, generator=g)).to(dtype) if norm else None
    b = torch.randn(rows, device=device, generator=g).to(dtype) if bias else None
    ref, ref_res = reference_gemv(x, dequantize_fp8(w8, scale, torch.float32), b, nw, 1e-6, r, silu)
    if m == 1:
        launch, configs = _launch, configs_for(n, k, gemv_configs(w8))
    else:
        launch, configs = _launch_rows, rows_configs_for(n, k, FP8_ROWS_CONFIGS[rows_tile(m)])
    assert configs, f"no FP8 configuration for {m} rows fits {n}x{k}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    nm = SimpleNamespace(weight=nw, eps=1e-6) if norm else None
    for cfg in configs:
        y, res_out = launch(x, w8, cfg, bias=b, norm=nm, residual=r, silu=silu, scale=scale)
        err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < tol, f"{m} rows, {cfg}: relative error {err:.2e}"
        if norm:
            assert torch.equal(res_out, ref_res), f"{m} rows, {cfg}: the new residual differs"


def gemv_operands(n, k, m, silu, bias, norm, residual, device="cuda", dtype=torch.bfloat16):
    """(weight, x, residual, norm weight, bias) for a GEMV test of m token rows on an [n, k] projection ([2n, k]
    with SwiGLU), seeded by the shape; None for the parts not asked for."""
    g = torch.Generator(device=device).manual_seed(n + k + m)
    rows = 2 * n if silu else n
    w = (torch.randn(rows, k, device=device, generator=g) / k**0.5).to(dtype)
    x = torch.randn(m, k, device=device, generator=g).to(dtype)
    r = torch.randn(m, k, device=device, generator=g).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device=device, generator=g)).to(dtype) if norm else None
    b = torch.randn(rows, device=device, generator=g).to(dtype) if bias else None
    return w, x, r, nw, b


def check_multi_row_gemv(m, n, k, norm, silu, bias, preload="all", device="cuda", dtype=torch.bfloat16):
    """The one-row GEMV (m = 1; preload "all": as many K steps' weights as fit loaded before the PDL wait, the
    engine's default; "1": the first; "0": none) or its multi-row form (m = 2..MULTI_MAX_ROWS token rows, padded
    to a power of two inside; it has no preload) in every configuration the engine times for an [n, k] weight at m
    rows, with the residual add, norm, SwiGLU and a bias fused as the engine runs it, against the same computation
    in torch."""
    with mock.patch.dict(os.environ, {"NANOVLLM_GEMV_PRELOAD": preload}):  # read at each launch
        _check_row_gemv(m, n, k, norm, silu, bias, device, dtype)


def _check_row_gemv(m, n, k, norm, silu, bias, device, dtype):
    from types import SimpleNamespace

    from engine.layers.gemv import GEMV_CONFIGS, MULTI_CONFIGS, _launch, configs_for, plan_tile, reference_gemv

    w, x, r, nw, b = gemv_operands(n, k, m, silu, bias, norm, norm, device, dtype)
    ref, ref_res = reference_gemv(x, w, b, nw, 1e-6, r, silu)
    configs = configs_for(n, k, GEMV_CONFIGS if m == 1 else MULTI_CONFIGS[plan_tile(m)])
    assert configs, f"no configuration fits {n}x{k}"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    nm = SimpleNamespace(weight=nw, eps=1e-6) if norm else None
    for cfg in configs:
        y, res_out = _launch(x, w, cfg, bias=b, norm=nm, residual=r, silu=silu)
        assert y.shape == ref.shape
        # Row by row: a row computed from another row's activations, or a padded row stored, fails here.
        for i in range(m):
            err = ((y[i].float() - ref[i].float()).norm() / ref[i].float().norm()).item()
            assert err < tol, f"{m} rows, {cfg}, row {i}: relative error {err:.2e}"
        if norm:
            assert torch.equal(res_out, ref_res), f"{m} rows, {cfg}: the new residual differs"


def assert_draws_follow(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """A chi-square bound on token draws `ids` from the distribution `probs` [vocab]."""
    expected = probs * len(ids)
    observed = torch.bincount(ids, minlength=len(probs)).float()
    # Tokens expected fewer than 5 times share one cell, as a chi-square test wants.
    rare = expected < 5
    expected = torch.cat([expected[~rare], expected[rare].sum().view(1)])
    observed = torch.cat([observed[~rare], observed[rare].sum().view(1)])
    chi2 = ((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum().item()
    cells = len(expected)
    # df = cells - 1; a correct sampler stays under this with probability ~1 - 1e-6 (for df up to ~100).
    assert chi2 < cells + 10 * cells**0.5 + 20, f"chi-square {chi2:.1f} over {cells} cells"


def check_fused_sample(vocab, block, rows, device="cuda", dtype=torch.bfloat16):
    """The sampling kernel (engine/layers/sample.py) against torch: greedy picks torch.argmax's token (ties to the
    lowest index, across chunks too); temperature draws follow softmax(logits / T) (a chi-square bound over `rows`
    draws of one row's logits), temperature-0 rows among them stay greedy, and the same (seed, token index) draws
    the same token (rows 0: greedy and the temperature-0 rows only). Every check launches twice or more, so the
    arrival counters must have been reset."""
    from engine.layers.sample import FusedSampler, sample_params

    sampler = FusedSampler(torch.device(device), block)
    g = torch.Generator().manual_seed(vocab)
    # Integer-valued logits: many ties, the maximum often in more than one chunk.
    tied = (torch.randn(8, vocab, generator=g) * 1.5).round().to(dtype).to(device)
    for _ in range(2):
        assert sampler(tied).tolist() == tied.argmax(-1).tolist()
    base = torch.randn(vocab, generator=g) * 1.5
    logits = base.to(dtype).to(device).repeat(max(rows, 4), 1)
    mixed = sample_params([7] * 4, [0, 1, 2, 3], [0.0, 1.0, 0.0, 1.0])
    picked = sampler(logits[:4], mixed.to(device)).tolist()
    top = logits[0].argmax().item()
    assert picked[0] == top and picked[2] == top, f"temperature-0 rows must be greedy: {picked}, argmax {top}"
    buffer = torch.full((6,), -1, device=device)  # out: the engine's token buffer, which the CUDA graphs read
    assert sampler(logits[:4], mixed.to(device), out=buffer[:4]).data_ptr() == buffer.data_ptr()
    assert buffer.tolist() == picked + [-1, -1]
    if not rows:
        return
    temperature = 0.7
    host = sample_params([1000 + r for r in range(rows)], [5] * rows, [temperature] * rows)
    ids = sampler(logits, host.to(device)).cpu()
    assert_draws_follow(ids, torch.softmax(base.to(dtype).float() / temperature, -1))
    assert len(set(ids.tolist())) > 1
    few = min(rows, 64)
    again = sampler(logits[:few], host[:, :few].contiguous().to(device)).cpu()
    assert torch.equal(ids[:few], again), "the same seeds and token indices must draw the same tokens"
    moved = sample_params([1000 + r for r in range(few)], [6] * few, [temperature] * few)
    assert not torch.equal(ids[:few], sampler(logits[:few], moved.to(device)).cpu()), "the next token must draw anew"


def rank_keys(logits: torch.Tensor) -> torch.Tensor:
    """The filter kernels' order key of 16-bit float logits: 0 for the largest value (engine/layers/sample.py)."""
    bits = logits.view(torch.int16).int() & 0xFFFF
    return torch.where(bits >= 0x8000, bits, 0x7FFF - bits)


# (temperature, top-k, top-p, min-p): each filter alone, all three, greedy with filters, top-k 1 on a tied maximum,
# and a row without filters in a filtered batch
FILTER_ROWS = [
    (0.7, 50, 1.0, 0.0),
    (1.0, -1, 0.9, 0.0),
    (0.5, -1, 1.0, 0.07),
    (1.3, 20, 0.5, 0.03),
    (0.0, 10, 0.5, 0.0),
    (0.8, 1, 1.0, 0.0),
    (1.0, -1, 1.0, 0.0),
]


def check_filtered_sample(vocab, block, filter_block, draws, draw_vocab, device="cuda", dtype=torch.bfloat16):
    """The top-k / top-p / min-p kernels (engine/layers/sample.py) against torch's filter (engine/sampler.py): per
    row of FILTER_ROWS, the tokens at or above the kernels' cut-offs are exactly those torch's filter keeps (logits
    on a 1/8 grid: ties at every cut-off, across chunks), every draw is one of them, greedy rows pick torch.argmax's
    token, and `draws` draws over the first `draw_vocab` logits follow torch's filtered distribution (chi-square).
    Float32 runs in float16 (the Triton interpreter has no bfloat16): the filters key on 16-bit floats."""
    from engine.layers.sample import FusedSampler, sample_params
    from engine.sampler import filter_probs

    dtype = torch.float16 if dtype == torch.float32 else dtype
    sampler = FusedSampler(torch.device(device), block, filter_block)
    g = torch.Generator().manual_seed(vocab + 1)
    n = len(FILTER_ROWS)
    logits = ((torch.randn(n, vocab, generator=g) * 20).round() / 8).to(dtype)
    logits[5, : vocab // 2] = logits[5].max()  # top-k 1 on a maximum tied across chunks
    logits[1, 3] = float("-inf")  # a banned token
    temps, top_k, top_p, min_p = (list(c) for c in zip(*FILTER_ROWS))

    def torch_keeps(x: torch.Tensor, t: float, k: int, p: float, mp: float) -> torch.Tensor:
        probs = torch.softmax(x.float() / max(t, 1e-5), -1).unsqueeze(0)
        k = torch.tensor([k if k > 0 else x.numel()])
        return filter_probs(probs, k, torch.tensor([p]), torch.tensor([mp]))[0]

    params = sample_params(list(range(n)), [0] * n, temps, top_k, top_p, min_p).to(device)
    for launch in range(2):  # the second launch needs the counters and bins cleared by the first
        ids = sampler(logits.to(device), params, filtered=True).cpu()
        cut = sampler.scratch["rowi"][: 4 * n].view(n, 4)[:, 2].cpu()
        floor = sampler.scratch["rowf"][: 4 * n].view(n, 4)[:, 3].cpu()
        for r, (t, k, p, mp) in enumerate(FILTER_ROWS):
            x = logits[r]
            if t == 0.0:
                assert ids[r] == x.float().argmax(), f"row {r}: greedy must pick torch.argmax's token"
                continue
            want = torch_keeps(x, t, k, p, mp) > 0
            got = (rank_keys(x) <= cut[r]) & (x.float() / t >= floor[r])
            assert torch.equal(got, want), (
                f"launch {launch}, row {r} {FILTER_ROWS[r]}: the kernels keep {int(got.sum())} tokens, torch "
                f"{int(want.sum())}; {int((got & ~want).sum())} only the kernels, {int((want & ~got).sum())} only torch"
            )
            assert want[ids[r]], f"row {r}: drew token {int(ids[r])}, outside torch's filter"
    assert int(torch_keeps(logits[5], 0.8, 1, 1.0, 0.0).gt(0).sum()) == vocab // 2, "a tied maximum survives top-k 1"
    if not draws:
        return
    t, k, p, mp = 0.9, 12, 0.8, 0.02
    x = logits[0, :draw_vocab]
    host = sample_params([1000 + r for r in range(draws)], [3] * draws, [t] * draws, [k] * draws, [p] * draws,
                         [mp] * draws)  # fmt: skip
    ids = sampler(x.to(device).repeat(draws, 1), host.to(device), filtered=True).cpu()
    probs = torch_keeps(x, t, k, p, mp)
    assert bool(probs[ids].gt(0).all()), "every draw must be one torch's filter keeps"
    assert_draws_follow(ids, probs)


def check_embed_sampled(hidden, device="cuda", dtype=torch.bfloat16):
    """The CUDA graphs' embedding kernel: each row's embedding is that of the sampler's token named by its source row,
    or of its input id where there is none (-1), for a hidden size that is not a power of two (a masked tail) and one
    wider than a block (the loop over blocks)."""
    from engine.layers.embedding import embed_sampled

    g = torch.Generator(device=device).manual_seed(hidden)
    weight = torch.randn(50, hidden, device=device, generator=g).to(dtype)
    ids = torch.tensor([3, 0, 7, 49, 12], device=device)
    src = torch.tensor([-1, 2, -1, 0, 1], device=device)
    sampled = torch.tensor([41, 5, 28], device=device)
    out = embed_sampled(weight, ids, src, sampled)
    tokens = torch.where(src >= 0, sampled[src.clamp(min=0)], ids)
    assert tokens.tolist() == [3, 28, 7, 41, 5]
    assert torch.equal(out, weight[tokens])
    assert embed_sampled(weight, ids[:0], src[:0], sampled).shape == (0, hidden)
