"""Split-KV paged decode attention for the smallest CUDA-graph batches, in one Triton kernel with the merge inside.

Why: at batch 1, FlashInfer's graph-mode decode always splits the KV and then runs a second kernel to merge the
splits (docs/benchmarks.md: 8.3 + 2.5 us per layer on Qwen3-8B, 7.6 + 2.4 on Qwen3-0.6B, at a 128-384-token
context whose KV is a few hundred KB). Here each program attends over one split of one KV head's pages for all
the query heads of its group (a tensor-core tile), stores its partial state, and the last program of the head to
finish, counted with an atomic, merges the splits. One launch per layer, no second kernel.
It serves the decode graphs of up to 8 requests: measured on an H100 (docs/benchmarks.md), attention per step at a
128-token prompt drops from 286 to 172 us at batch 4 and from 299 to 218 us at batch 8 (Qwen3-0.6B, 28 layers); at a
3,800-token context from 341 to 312 us at batch 1 and from 1,337 to 1,262 us at batch 8.
NANOVLLM_TRITON_DECODE_MAX_ROWS sets the largest graph batch that uses it (0 switches it off).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from engine.layers.kernels import triton_available

MAX_SPLITS = 32


def _env_count(name: str, default: int, unit: str) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} must be a whole number of {unit} (0 = off)")
    return int(value)


def triton_decode_max_rows() -> int:
    """The largest decode batch served by this kernel (NANOVLLM_TRITON_DECODE_MAX_ROWS, default 8)."""
    return _env_count("NANOVLLM_TRITON_DECODE_MAX_ROWS", 8, "requests")


def triton_prefill_max_tokens() -> int:
    """The largest prefill/mixed graph (query tokens) served by this kernel (NANOVLLM_TRITON_PREFILL_MAX_TOKENS,
    default 64)."""
    return _env_count("NANOVLLM_TRITON_PREFILL_MAX_TOKENS", 64, "tokens")


def triton_decode_supported(head_dim: int, block_size: int, device: torch.device) -> bool:
    """Whether the kernel can run: Triton importable, CUDA, power-of-two head_dim and page size of at least 16."""
    if not triton_available() or device.type != "cuda":
        return False
    return all(v >= 16 and v & (v - 1) == 0 for v in (head_dim, block_size))


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def split_attention(
        q_ptr,
        cache_ptr,
        qo_indptr_ptr,
        indptr_ptr,
        indices_ptr,
        last_ptr,
        part_o_ptr,
        part_m_ptr,
        part_l_ptr,
        counter_ptr,
        out_ptr,
        scale_log2,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        G: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_R: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        S: tl.constexpr,
    ):
        # BLOCK_Q == 1: decode, row b's one query token is token b. Otherwise row b's query tokens are
        # qo_indptr[b]..qo_indptr[b + 1], the last ones of its kv_len tokens (causal), in tiles of BLOCK_Q tokens.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if BLOCK_Q == 1:
            q_start = b
            q_len = 1
        else:
            q_start = tl.load(qo_indptr_ptr + b)
            q_len = tl.load(qo_indptr_ptr + b + 1) - q_start
        start = tl.load(indptr_ptr + b)
        num_pages = tl.load(indptr_ptr + b + 1) - start
        kv_len = (num_pages - 1) * BS + tl.load(last_ptr + b)
        per_split = tl.cdiv(num_pages, S)
        first = split * per_split
        stop = tl.minimum(first + per_split, num_pages)
        r = tl.arange(0, BLOCK_R)  # tile row: query token r // G of the tile, query head r % G of the group
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        for qb in range(0, q_len, BLOCK_Q):
            live = (r < BLOCK_Q * G) & (qb + r // G < q_len)
            qrow = (q_start + qb + r // G) * HQ + kvh * G + r % G  # row in q [tokens * HQ, D]
            q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
            qpos = kv_len - q_len + qb + r // G  # each row's position: it sees keys at positions <= qpos
            hi = tl.minimum(stop, (tl.minimum(kv_len - q_len + qb + BLOCK_Q, kv_len) - 1) // BS + 1)
            m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
            acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
            for p in range(first, hi):
                page = tl.load(indices_ptr + start + p).to(tl.int64)
                # HND page [2, HKV, BS, D]: this head's K rows, then its V rows HKV * BS * D further.
                k_rows = cache_ptr + ((page * 2 * HKV + kvh) * BS + t)[:, None] * D + d[None, :]
                k = tl.load(k_rows)
                v = tl.load(k_rows + HKV * BS * D)
                scores = tl.dot(q, tl.trans(k)) * scale_log2
                scores = tl.where(p * BS + t[None, :] <= qpos[:, None], scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                # A row whose keys in this page are all in its future keeps m = -inf; exp2(-inf - 0) = 0, not NaN.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_use)
                probs = tl.exp2(scores - m_use[:, None])
                l_sum = l_sum * alpha + tl.sum(probs, axis=1)
                acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
                m = m_new
            part = qrow * S + split
            tl.store(part_o_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])
            tl.store(part_m_ptr + part, m, mask=live)
            tl.store(part_l_ptr + part, l_sum, mask=live)
        if q_len > 0:
            # Every thread's partial stores happen before the (release) arrival; the last arrival merges.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + b * HKV + kvh, 1, sem="acq_rel")
            if arrived == S - 1:
                splits = tl.arange(0, S)
                if BLOCK_Q == 1:
                    for gi in tl.static_range(G):
                        h = b * HQ + kvh * G + gi
                        ms = tl.load(part_m_ptr + h * S + splits, cache_modifier=".cg")
                        ls = tl.load(part_l_ptr + h * S + splits, cache_modifier=".cg")
                        os_ = tl.load(part_o_ptr + (h * S + splits)[:, None] * D + d[None, :], cache_modifier=".cg")
                        w = tl.exp2(ms - tl.max(ms, axis=0))  # empty splits have m = -inf: weight 0
                        o = tl.sum(w[:, None] * os_, axis=0) / tl.sum(w * ls, axis=0)
                        tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty))
                else:
                    # A tile of (token, head) rows at a time, one split after another: every row's first split
                    # holds its first key, so its maximum is finite.
                    for qb in range(0, q_len, BLOCK_Q):
                        live = (r < BLOCK_Q * G) & (qb + r // G < q_len)
                        qrow = (q_start + qb + r // G) * HQ + kvh * G + r % G
                        ms = tl.load(
                            part_m_ptr + qrow[:, None] * S + splits[None, :],
                            mask=live[:, None],
                            other=float("-inf"),
                            cache_modifier=".cg",
                        )
                        ls = tl.load(
                            part_l_ptr + qrow[:, None] * S + splits[None, :],
                            mask=live[:, None],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        m_max = tl.where(live, tl.max(ms, axis=1), 0.0)
                        denom = tl.sum(tl.exp2(ms - m_max[:, None]) * ls, axis=1)
                        o = tl.zeros([BLOCK_R, D], dtype=tl.float32)
                        for s in tl.static_range(S):
                            m_s = tl.load(
                                part_m_ptr + qrow * S + s, mask=live, other=float("-inf"), cache_modifier=".cg"
                            )
                            o_s = tl.load(
                                part_o_ptr + (qrow * S + s)[:, None] * D + d[None, :],
                                mask=live[:, None],
                                other=0.0,
                                cache_modifier=".cg",
                            )
                            o += tl.exp2(m_s - m_max)[:, None] * o_s
                        o = o / tl.where(live, denom, 1.0)[:, None]
                        tl.store(
                            out_ptr + qrow[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=live[:, None]
                        )
                tl.store(counter_ptr + b * HKV + kvh, 0)  # ready for the next layer's launch

    return split_attention


class SplitDecode:
    """The kernel's fixed buffers for one captured batch size (partial states and arrival counters)."""

    block_q = 1  # query tokens per row and tile

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, device, num_sms: int):
        self.rows, self.hq, self.hkv, self.d = rows, num_heads, num_kv_heads, head_dim
        self.splits = self._splits(rows, num_kv_heads, num_sms)
        self._allocate(self._tokens(rows), device)
        group = num_heads // num_kv_heads
        self.block_r = max(16, 1 << (self.block_q * group - 1).bit_length())  # a tensor-core tile has >= 16 rows

    @staticmethod
    def _splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
        # About two programs per SM; a power of two so the merge can tile the splits.
        want = max(1, min(MAX_SPLITS, 2 * num_sms // (rows * num_kv_heads)))
        return 1 << (want.bit_length() - 1)

    def _tokens(self, rows: int) -> int:
        return rows

    def _allocate(self, tokens: int, device) -> None:
        n = tokens * self.hq * self.splits
        self.part_o = torch.empty(n, self.d, dtype=torch.float32, device=device)
        self.part_m = torch.empty(n, dtype=torch.float32, device=device)
        self.part_l = torch.empty(n, dtype=torch.float32, device=device)
        self.counter = torch.zeros(self.rows * self.hkv, dtype=torch.int32, device=device)
        self.scale_log2 = math.log2(math.e) / math.sqrt(self.d)

    def __call__(self, q, kv_cache, kv_indptr, kv_indices, kv_last, qo_indptr=None) -> torch.Tensor:
        """Attention of q [tokens, Hq, D] over the paged HND cache [pages, 2, Hkv, BS, D] given by the page table
        (decode: token b is row b's query)."""
        out = torch.empty_like(q)
        _build_kernel()[(self.rows, self.hkv, self.splits)](
            q,
            kv_cache,
            kv_indptr if qo_indptr is None else qo_indptr,  # decode never reads it
            kv_indptr,
            kv_indices,
            kv_last,
            self.part_o,
            self.part_m,
            self.part_l,
            self.counter,
            out,
            self.scale_log2,
            HQ=self.hq,
            HKV=self.hkv,
            G=self.hq // self.hkv,
            BLOCK_Q=self.block_q,
            BLOCK_R=self.block_r,
            D=self.d,
            BS=kv_cache.shape[3],
            S=self.splits,
            num_warps=4 if self.block_r <= 16 else 8,
        )
        return out


class SplitPrefill(SplitDecode):
    """The same kernel for small prefill/mixed steps of up to `tokens` query tokens over `rows` requests, each
    causal over its pages; tiles of about 64 (token, query head) rows."""

    def __init__(self, rows: int, tokens: int, num_heads, num_kv_heads, head_dim, device, num_sms):
        group = num_heads // num_kv_heads
        self.block_q = max(1, min(tokens, 64 // group))
        self.max_tokens = tokens
        super().__init__(rows, num_heads, num_kv_heads, head_dim, device, num_sms)

    @staticmethod
    def _splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
        # Sized for one request with queries (the common small prefill: a follow-up turn over a cached prefix):
        # about a program per SM; more splits would make the final merge (S tiles per 64 rows) longer.
        want = max(1, min(16, num_sms // num_kv_heads))
        return 1 << (want.bit_length() - 1)

    def _tokens(self, rows: int) -> int:
        return self.max_tokens
