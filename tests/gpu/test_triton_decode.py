"""The split-KV Triton attention kernel (engine/attention/triton_decode.py), decode and small causal prefill, against
attention computed in torch."""

from __future__ import annotations

import math

import pytest
import torch

from engine.attention.triton_decode import SplitDecode, SplitPrefill


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
def test_split_decode_matches_torch(lens, hq, hkv, d, bs):
    g = torch.Generator(device="cuda").manual_seed(sum(lens))
    cache, indptr, indices, last = paged(lens, hkv, d, bs, pages_total=sum(-(-n // bs) for n in lens) + 8, g=g)
    q = torch.randn(len(lens), hq, d, device="cuda", generator=g).to(torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kernel = SplitDecode(len(lens), hq, hkv, d, "cuda", sms)
    for _ in range(2):  # the second launch checks that the arrival counters were reset
        out = kernel(q, cache, indptr, indices, last)
        for b, n in enumerate(lens):
            ref = causal_reference(q[b : b + 1], cache, indices[indptr[b] : indptr[b + 1]], n, hkv)
            err = ((out[b].float() - ref[0]).norm() / ref.norm()).item()
            assert err < 1e-2, f"row {b} ({n} tokens): relative error {err:.2e}"
    assert not kernel.counter.any()


def causal_reference(q, cache, pages, kv_len, hkv):
    """fp32 attention of the last q.shape[0] of kv_len tokens (q [n, Hq, D]), each over the keys up to itself."""
    n, hq, d = q.shape
    pages = pages.long()
    k = cache[pages, 0].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :kv_len].float()
    v = cache[pages, 1].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :kv_len].float()
    g = hq // hkv
    qh = q.float().view(n, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, n * g, d)
    scores = qh @ k.transpose(1, 2) / math.sqrt(d)
    pos = (kv_len - n + torch.arange(n, device=q.device)).repeat_interleave(g)
    future = torch.arange(kv_len, device=q.device)[None, None, :] > pos[None, :, None]
    out = torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ v
    return out.view(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, hq, d)


@pytest.mark.parametrize(
    "kv_lens,q_lens,hq,hkv,d,bs,tokens",
    [
        ([4096 + 32], [32], 16, 8, 128, 64, 32),  # Qwen3-0.6B: a follow-up turn over a cached 4k prefix
        ([4100], [20], 32, 8, 128, 64, 32),  # Qwen3-8B heads (tiles of 16 tokens x 4 heads), padding after
        ([37, 64, 700, 1], [5, 64 - 5 - 1 - 3, 3, 1], 32, 8, 64, 16, 64),  # mixed: a whole prompt, chunks, decode
        ([300], [3], 9, 3, 64, 64, 16),  # SmolLM2: groups of 3, tiles of 21 tokens
    ],
)
def test_split_prefill_matches_torch(kv_lens, q_lens, hq, hkv, d, bs, tokens):
    g = torch.Generator(device="cuda").manual_seed(sum(kv_lens))
    rows = len(kv_lens) + 2  # an unused row (no queries) and a padding row, as in the prefill graphs
    pad = tokens - sum(q_lens)
    kv_all = kv_lens + [1, max(pad, 1)]
    total_pages = sum(-(-n // bs) for n in kv_all) + 8
    cache, indptr, indices, last = paged(kv_all, hkv, d, bs, pages_total=total_pages, g=g)
    qo = torch.tensor([0, *q_lens, 0, pad], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(tokens, hq, d, device="cuda", generator=g).to(torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    kernel = SplitPrefill(rows, tokens, hq, hkv, d, "cuda", sms)
    tile_row, tile_qoff = kernel.tile_table([*q_lens, 0, pad])
    kernel.tile_row.copy_(tile_row)
    kernel.tile_qoff.copy_(tile_qoff)
    for _ in range(2):  # the second launch checks that the arrival counters were reset
        out = kernel(q, cache, indptr, indices, last, qo)
        for b, (n, m) in enumerate(zip(kv_lens, q_lens)):
            ref = causal_reference(q[qo[b] : qo[b + 1]], cache, indices[indptr[b] : indptr[b + 1]], n, hkv)
            err = ((out[qo[b] : qo[b + 1]].float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"row {b} ({m} queries over {n} tokens): relative error {err:.2e}"
    assert not kernel.counter.any()
