"""The split-KV Triton decode kernel (engine/attention/triton_decode.py) against attention computed in torch."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention.triton_decode import SplitDecode


def paged(lens, hkv, d, bs, pages_total, g):
    """A random HND cache and a shuffled page table holding sequences of the given lengths."""
    cache = torch.randn(pages_total, 2, hkv, bs, d, device="cuda", generator=g).to(torch.bfloat16)
    free = torch.randperm(pages_total, device="cuda", generator=g).tolist()
    indptr, indices, last = [0], [], []
    for n in lens:
        pages = -(-n // bs)
        indices += free[:pages]
        free = free[pages:]
        indptr.append(indptr[-1] + pages)
        last.append(n - (pages - 1) * bs)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device="cuda")  # noqa: E731
    return cache, as_i32(indptr), as_i32(indices), as_i32(last)


# (fewest pages per split, most pages in one split): the engine's default, splits only, up to 8 pages in one split
SPLIT_RULES = [(1, 2), (1, 0), (8, 0)]


@pytest.mark.parametrize(
    "lens,hq,hkv,d,bs",
    [
        ([130], 16, 8, 128, 64),  # Qwen3-0.6B, one page and a bit
        ([1], 32, 8, 128, 64),  # one token
        ([5000], 32, 8, 128, 64),  # Qwen3-8B at a long context: many pages per split
        ([64, 700, 33, 4096], 32, 8, 64, 16),  # Llama-1B heads, 16-token pages, four rows
        ([300], 9, 3, 64, 64),  # SmolLM2: a group of 3 padded to a 16-row tile
    ],
)
@pytest.mark.parametrize("min_pages,one_split", SPLIT_RULES)
def test_split_decode_matches_torch(lens, hq, hkv, d, bs, min_pages, one_split):
    g = torch.Generator(device="cuda").manual_seed(sum(lens))
    cache, indptr, indices, last = paged(lens, hkv, d, bs, pages_total=sum(-(-n // bs) for n in lens) + 8, g=g)
    q = torch.randn(len(lens), hq, d, device="cuda", generator=g).to(torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kernel = SplitDecode(len(lens), hq, hkv, d, "cuda", sms)
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


@pytest.mark.parametrize(
    "lens,hq,hkv,d,bs,norm",
    [
        ([130], 16, 8, 128, 64, True),  # Qwen3-0.6B: the new token opens no page
        ([129], 16, 8, 128, 64, True),  # the new token is alone in its page
        ([1, 5000], 32, 8, 128, 64, True),  # a first token, and many pages per split
        ([64, 700, 33, 4096], 32, 8, 64, 16, False),  # Llama-1B heads (no q/k norm), 16-token pages
        ([300, 17], 9, 3, 64, 64, False),  # SmolLM2: a group of 3 padded to a 16-row tile
    ],
)
@pytest.mark.parametrize("min_pages,one_split", SPLIT_RULES)
def test_fused_split_decode_matches_separate_kernels(lens, hq, hkv, d, bs, norm, min_pages, one_split):
    """q/k norm + rope + K/V append folded into the attention kernel: the same output and cache as the fused q/k
    kernel followed by the attention kernel, and nothing written but each row's new slot."""
    from engine.layers.fused_qkv import qk_norm_rope_append

    g = torch.Generator(device="cuda").manual_seed(len(lens) + sum(lens))
    cache, indptr, indices, last = paged(lens, hkv, d, bs, pages_total=sum(-(-n // bs) for n in lens) + 8, g=g)
    rows = len(lens)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, device="cuda", generator=g).to(torch.bfloat16)
    qw = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).to(torch.bfloat16) if norm else None
    kw = (1 + 0.3 * torch.randn(d, device="cuda", generator=g)).to(torch.bfloat16) if norm else None
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(8192, dtype=torch.float32), inv)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).cuda()
    positions = torch.tensor([n - 1 for n in lens], device="cuda")  # int64, as the graph's input rows are
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kernel = SplitDecode(rows, hq, hkv, d, "cuda", sms)
    kernel.min_pages = min_pages
    kernel.one_split_pages = one_split

    ref_cache = cache.clone()
    q = qk_norm_rope_append(
        qkv, hq, hkv, qw, kw, 1e-6, cos_sin, positions, torch.arange(rows, device="cuda", dtype=torch.int32),
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
