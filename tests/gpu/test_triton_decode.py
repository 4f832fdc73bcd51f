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
            pages = indices[indptr[b] : indptr[b + 1]].long()
            k = cache[pages, 0].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
            v = cache[pages, 1].permute(1, 0, 2, 3).reshape(hkv, -1, d)[:, :n].float()
            qb = q[b].float().view(hkv, hq // hkv, d)
            ref = (torch.softmax(qb @ k.transpose(1, 2) / math.sqrt(d), -1) @ v).reshape(hq, d)
            err = ((out[b].float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, f"row {b} ({n} tokens): relative error {err:.2e}"
    assert not kernel.counter.any()
