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
        tile_row_ptr,
        tile_qoff_ptr,
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
        MERGE_R: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        S: tl.constexpr,
    ):
        # Program (tile, KV head, split). BLOCK_Q == 1: decode, tile b is row b and its one query is token b.
        # Otherwise tile i holds query tokens tile_qoff[i].. (up to BLOCK_Q) of row tile_row[i], whose queries are
        # tokens qo_indptr[row]..qo_indptr[row + 1], the last ones of its kv_len tokens (causal).
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        if BLOCK_Q == 1:
            row = tile
            q_off = 0
            q_start = tile
            q_len = 1
        else:
            row = tl.load(tile_row_ptr + tile)
            q_off = tl.load(tile_qoff_ptr + tile)  # unused tiles: q_off >= q_len, nothing to do
            q_start = tl.load(qo_indptr_ptr + row)
            q_len = tl.load(qo_indptr_ptr + row + 1) - q_start
        start = tl.load(indptr_ptr + row)
        num_pages = tl.load(indptr_ptr + row + 1) - start
        kv_len = (num_pages - 1) * BS + tl.load(last_ptr + row)
        per_split = tl.cdiv(num_pages, S)
        first = split * per_split
        stop = tl.minimum(first + per_split, num_pages)
        r = tl.arange(0, BLOCK_R)  # tile row: query token r // G of the tile, query head r % G of the group
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        live = (r < BLOCK_Q * G) & (q_off + r // G < q_len)
        qrow = (q_start + q_off + r // G) * HQ + kvh * G + r % G  # row in q [tokens * HQ, D]
        q = tl.load(q_ptr + qrow[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        qpos = kv_len - q_len + q_off + r // G  # each row's position: it sees keys at positions <= qpos
        hi = tl.minimum(stop, (tl.minimum(kv_len - q_len + q_off + BLOCK_Q, kv_len) - 1) // BS + 1)
        hi = tl.where(q_off < q_len, hi, first)
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
        if q_off < q_len:
            # Every thread's partial stores happen before the (release) arrival; the last arrival merges.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + tile * HKV + kvh, 1, sem="acq_rel")
            if arrived == S - 1:
                splits = tl.arange(0, S)
                if BLOCK_Q == 1:
                    for gi in tl.static_range(G):
                        h = row * HQ + kvh * G + gi
                        ms = tl.load(part_m_ptr + h * S + splits, cache_modifier=".cg")
                        ls = tl.load(part_l_ptr + h * S + splits, cache_modifier=".cg")
                        os_ = tl.load(part_o_ptr + (h * S + splits)[:, None] * D + d[None, :], cache_modifier=".cg")
                        w = tl.exp2(ms - tl.max(ms, axis=0))  # empty splits have m = -inf: weight 0
                        o = tl.sum(w[:, None] * os_, axis=0) / tl.sum(w * ls, axis=0)
                        tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty))
                else:
                    # MERGE_R rows x all splits per load; every row's first split holds its first key, so its
                    # maximum is finite.
                    for half in tl.static_range(BLOCK_R // MERGE_R):
                        rr = half * MERGE_R + tl.arange(0, MERGE_R)
                        ok = (rr < BLOCK_Q * G) & (q_off + rr // G < q_len)
                        hrow = (q_start + q_off + rr // G) * HQ + kvh * G + rr % G
                        idx = hrow[:, None] * S + splits[None, :]
                        ms = tl.load(part_m_ptr + idx, mask=ok[:, None], other=float("-inf"), cache_modifier=".cg")
                        ls = tl.load(part_l_ptr + idx, mask=ok[:, None], other=0.0, cache_modifier=".cg")
                        w = tl.exp2(ms - tl.where(ok, tl.max(ms, axis=1), 0.0)[:, None])
                        denom = tl.where(ok, tl.sum(w * ls, axis=1), 1.0)
                        os_ = tl.load(
                            part_o_ptr + idx[:, :, None] * D + d[None, None, :],
                            mask=ok[:, None, None],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        o = tl.sum(os_ * w[:, :, None], axis=1) / denom[:, None]
                        dst = out_ptr + hrow[:, None] * D + d[None, :]
                        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=ok[:, None])
                tl.store(counter_ptr + tile * HKV + kvh, 0)  # ready for the next layer's launch

    return split_attention


class SplitDecode:
    """The kernel's fixed buffers for one captured batch size (partial states and arrival counters)."""

    block_q = 1  # query tokens per tile
    launch_options = {"num_warps": 4}

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, device, num_sms: int):
        self.rows, self.hq, self.hkv, self.d = rows, num_heads, num_kv_heads, head_dim
        group = num_heads // num_kv_heads
        self.block_r = max(16, 1 << (self.block_q * group - 1).bit_length())  # a tensor-core tile has >= 16 rows
        self.splits = self._splits(rows, num_kv_heads, num_sms)
        self.tiles = self._num_tiles()
        tokens = self._tokens()
        n = tokens * num_heads * self.splits
        self.part_o = torch.empty(n, head_dim, dtype=torch.float32, device=device)
        self.part_m = torch.empty(n, dtype=torch.float32, device=device)
        self.part_l = torch.empty(n, dtype=torch.float32, device=device)
        self.counter = torch.zeros(self.tiles * num_kv_heads, dtype=torch.int32, device=device)
        self.scale_log2 = math.log2(math.e) / math.sqrt(head_dim)
        # The merge loads MERGE_R rows x all splits at once (at most 16K fp32 values: registers).
        self.merge_r = min(self.block_r, max(1, 16384 // (self.splits * head_dim)))

    @staticmethod
    def _splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
        # About two programs per SM; a power of two so the merge can tile the splits.
        want = max(1, min(MAX_SPLITS, 2 * num_sms // (rows * num_kv_heads)))
        return 1 << (want.bit_length() - 1)

    def _num_tiles(self) -> int:
        return self.rows

    def _tokens(self) -> int:
        return self.rows

    def _launch(self, q, kv_cache, qo_indptr, tile_row, tile_qoff, kv_indptr, kv_indices, kv_last) -> torch.Tensor:
        out = torch.empty_like(q)
        _build_kernel()[(self.tiles, self.hkv, self.splits)](
            q,
            kv_cache,
            qo_indptr,
            tile_row,
            tile_qoff,
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
            MERGE_R=self.merge_r,
            D=self.d,
            BS=kv_cache.shape[3],
            S=self.splits,
            **self.launch_options,
        )
        return out

    def __call__(self, q, kv_cache, kv_indptr, kv_indices, kv_last) -> torch.Tensor:
        """Attention of q [rows, Hq, D] (one query per row) over the paged HND cache [pages, 2, Hkv, BS, D] given
        by the page table."""
        # Decode reads no query offsets or tile table: any int32 tensor stands in.
        return self._launch(q, kv_cache, kv_indptr, kv_indptr, kv_indptr, kv_indptr, kv_indices, kv_last)


class SplitPrefill(SplitDecode):
    """The same kernel for small prefill/mixed steps of up to `tokens` query tokens over `rows` requests, each
    causal over its pages, in tiles of 16 (token, query head) rows: many programs and a short merge per tile."""

    def __init__(self, rows: int, tokens: int, num_heads, num_kv_heads, head_dim, device, num_sms, **tuning):
        group = num_heads // num_kv_heads
        # tuning (gpu_profile.py splitprefill sweeps it): block_rows, splits, num_warps, num_stages.
        self.tuning = tuning
        self.block_q = max(1, min(tokens, tuning.get("block_rows", 16) // group))
        self.max_tokens = tokens
        self.launch_options = {k: tuning[k] for k in ("num_warps", "num_stages") if k in tuning} or {"num_warps": 4}
        super().__init__(rows, num_heads, num_kv_heads, head_dim, device, num_sms)
        self.tile_row = torch.zeros(self.tiles, dtype=torch.int32, device=device)
        self.tile_qoff = torch.zeros(self.tiles, dtype=torch.int32, device=device)

    def _splits(self, rows: int, num_kv_heads: int, num_sms: int) -> int:
        # Sized for one request with queries (the common small prefill: a follow-up turn over a cached prefix):
        # a program per SM and query tile.
        want = self.tuning.get("splits") or max(1, min(16, num_sms // num_kv_heads))
        return 1 << (want.bit_length() - 1)

    def _num_tiles(self) -> int:
        # Each request's queries start a new tile: at most one partial tile per row beyond the full ones.
        return -(-self.max_tokens // self.block_q) + self.rows

    def _tokens(self) -> int:
        return self.max_tokens

    def tile_table(self, q_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Host (row, first query) of every tile for rows with these query counts; unused tiles get a query
        offset past their row's queries."""
        rows, offs = [], []
        for i, n in enumerate(q_lens):
            rows += [i] * -(-n // self.block_q)
            offs += range(0, n, self.block_q)
        unused = self.tiles - len(rows)
        rows += [0] * unused
        offs += [self.max_tokens] * unused
        return torch.tensor(rows, dtype=torch.int32), torch.tensor(offs, dtype=torch.int32)

    def __call__(self, q, kv_cache, kv_indptr, kv_indices, kv_last, qo_indptr) -> torch.Tensor:
        """Causal attention of q [tokens, Hq, D] (row b's queries are tokens qo_indptr[b]..qo_indptr[b + 1], the
        last of its keys) over the page table; the tile table must have been filled (tile_table)."""
        args = (qo_indptr, self.tile_row, self.tile_qoff, kv_indptr, kv_indices, kv_last)
        return self._launch(q, kv_cache, *args)
