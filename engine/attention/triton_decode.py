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
In those graphs it also takes the step's QKV projection and does the q/k RMSNorm, rope and K/V append itself
(SplitDecode.fused): a decode step then takes 0.94-0.98 of its time at batch 1, 4 and 8 (H100, docs/benchmarks.md).
Fused, its pages hold only earlier steps' K/V, so each split loads its first page (and the rope and norm inputs)
before the PDL wait, while the QKV projection still runs: Qwen3-0.6B decode 1.03x / 1.09x / 1.06x faster at 1 / 4
/ 8 requests (H200, docs/benchmarks.md section 1; NANOVLLM_ATTN_PRELOAD=0 loads them after the wait). The graph
of 8 requests loads two pages per split there (1.01-1.04x at 5-8 requests; one page stays faster below, section 6).
The decode graphs of 48 requests and more have a twin that attends with it (flashinfer_backend.py), for steps with
one dominant context and steps of up to 128 requests with short contexts; there no split is shorter than the step's
mean context (mean_chunk), so most requests take one program per KV head and no merge.
Cascade graphs use it for each request's own pages, where it also returns the base-2 log-sum-exp that FlashInfer's
merge takes and the rotated q for the shared level: at 64 requests with ~200 own tokens it reads them faster than
FlashInfer's tensor-core decode (22.7 against 29.1 us per layer timed alone, H100), and the cascade decode phase of
the shared-prefix benchmark ran 1.06-1.10x faster (docs/benchmarks.md, section 3).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator

import torch

from engine.config import env_choice, env_whole_number
from engine.layers.kernels import launch_options, resident_programs, triton_available

MAX_SPLITS = 32
# Fewest pages a split reads: 2 measured +4% and -1% in two A/Bs (H100, docs/benchmarks.md), not a clear gain.
# NANOVLLM_ATTN_MIN_PAGES overrides it (A/B runs); a context of at most that many pages takes one split.
MIN_PAGES_PER_SPLIT = 1
# A context of at most this many pages is attended by one program per KV head, which then stores its output
# directly. Measured in one engine (H100, 64-token pages, docs/benchmarks.md): at 2 pages the step takes 0.94 of
# its split time at batch 1 and 0.97 at batch 4-8; at 3 pages 0.99 at batch 1 but 1.02-1.03 at batch 4-8; from 4
# pages on one split loses.
ONE_SPLIT_PAGES = 2

# Set inside deferred_compiles(): the compiles that launches noted instead of launching, one per configuration.
_deferred: dict[tuple, Callable[[], object]] | None = None


def triton_decode_max_rows() -> int:
    """The largest decode batch served by this kernel (NANOVLLM_TRITON_DECODE_MAX_ROWS, default 8)."""
    return env_whole_number("NANOVLLM_TRITON_DECODE_MAX_ROWS", 8, "requests (0 = off)")


def fused_decode_enabled() -> bool:
    """Whether decode graphs that use this kernel also fold the q/k norm, rope and K/V append into it
    (NANOVLLM_FUSED_DECODE, default 1; 0 keeps the separate fused q/k kernel before it)."""
    value = os.environ.get("NANOVLLM_FUSED_DECODE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"NANOVLLM_FUSED_DECODE={value!r} must be 0 or 1")
    return value == "1"


# Graphs of at least this many requests preload two pages per split by default (NANOVLLM_ATTN_PRELOAD=auto).
# Measured on an H200 (docs/benchmarks.md, section 6), Qwen3-0.6B, two pages against one: 1.003-1.029x at 5
# requests and 1.009-1.042x at 8 (prompts of 128-1,024 tokens), but 0.89-0.94x at 4 and 0.87x at 1, where four
# pages (16 warps) lost too (0.80-0.87x at 1, 0.86-0.98x at 4).
PRELOAD_TWO_PAGES_ROWS = 8


def attn_preload_pages(rows: int = 1) -> int:
    """NANOVLLM_ATTN_PRELOAD: how many pages of each split the fused kernel loads before its PDL wait, for a graph
    of `rows` requests: "auto" (the default) 2 from PRELOAD_TWO_PAGES_ROWS requests, else 1 (its first page); "0"
    none (all after the wait); "1", "2" or "4" that many. Splits then hold at least that many pages, up to that many
    take one split, and the kernel runs 4 warps a page (cascade and the large-batch twins keep one page)."""
    value = env_choice("NANOVLLM_ATTN_PRELOAD", "auto", ("auto", "0", "1", "2", "4"))
    if value == "auto":
        return 2 if rows >= PRELOAD_TWO_PAGES_ROWS else 1
    return int(value)


def triton_decode_supported(head_dim: int, block_size: int, device: torch.device) -> bool:
    """Whether the kernel can run: Triton importable, CUDA, power-of-two head_dim and page size of at least 16."""
    if not triton_available() or device.type != "cuda":
        return False
    return all(v >= 16 and v & (v - 1) == 0 for v in (head_dim, block_size))


@contextlib.contextmanager
def deferred_compiles() -> Iterator[dict[tuple, Callable[[], object]]]:
    """Within it, SplitDecode launches nothing (its outputs stay unwritten): the first call of each kernel
    configuration adds its compile (Triton's warmup, same arguments) to the dict it yields, to be run later side by
    side.

    Why: each of a graph set's configurations (split count, fused q/k, cascade states) compiles on its first launch
    in about a second, and the graphs' warm-ups launched them one after another (docs/benchmarks.md, section 10)."""
    global _deferred
    calls: dict[tuple, Callable[[], object]] = {}
    _deferred = calls
    try:
        yield calls
    finally:
        _deferred = None


# The kernel's Triton helpers, set by _build_kernel (module globals: Triton's interpreter resolves names there).
page_kv = pages_kv = attend_page = rope_norm_inputs = None


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def load_page(cache_ptr, indices_ptr, entry, kvh, t, d, HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
        # The K and V rows of one KV head in the page at page-table entry `entry`. HND page [2, HKV, BS, D]: this
        # head's K rows, then its V rows HKV * BS * D further.
        page = tl.load(indices_ptr + entry).to(tl.int64)
        k_rows = cache_ptr + ((page * 2 * HKV + kvh) * BS + t)[:, None] * D + d[None, :]
        return tl.load(k_rows), tl.load(k_rows + HKV * BS * D)

    @triton.jit
    def load_pages(
        cache_ptr, indices_ptr, entry, count, kvh, tp, d, HKV: tl.constexpr, BS: tl.constexpr, D: tl.constexpr
    ):
        # As load_page for the `count` pages from page-table entry `entry`, as one [pages * BS, D] tile whose rows
        # past them are zero (tp: arange over the tile's rows).
        ok = tp // BS < count
        page = tl.load(indices_ptr + entry + tp // BS, mask=ok, other=0).to(tl.int64)
        k_rows = cache_ptr + ((page * 2 * HKV + kvh) * BS + tp % BS)[:, None] * D + d[None, :]
        return tl.load(k_rows, mask=ok[:, None], other=0.0), tl.load(k_rows + HKV * BS * D, mask=ok[:, None], other=0.0)

    @triton.jit
    def attend(q, k, v, valid, t, m, l_sum, acc, scale_log2):
        # One page's step of the online softmax, its first `valid` slots counted (base 2, scores pre-scaled).
        scores = tl.dot(q, tl.trans(k)) * scale_log2
        scores = tl.where(t[None, :] < valid, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        probs = tl.exp2(scores - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
        return m_new, l_sum, acc

    @triton.jit
    def rope_inputs(q_w_ptr, k_w_ptr, cos_sin_ptr, rope_pos_ptr, b, d, partner, D: tl.constexpr, NORM: tl.constexpr):
        # Row b's rope cos and signed sin (first half: x1 cos - x2 sin; second: x2 cos + x1 sin) at its position,
        # and with NORM the q and k norm weights at each element and at its partner (else placeholders).
        pos = tl.load(rope_pos_ptr + b).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * D + d % (D // 2))
        sin = tl.load(cos_sin_ptr + pos * D + D // 2 + d % (D // 2))
        sin = tl.where(d < D // 2, -sin, sin)
        qw = cos
        qw_p = cos
        kw = cos
        kw_p = cos
        if NORM:
            qw = tl.load(q_w_ptr + d).to(tl.float32)
            qw_p = tl.load(q_w_ptr + partner).to(tl.float32)
            kw = tl.load(k_w_ptr + d).to(tl.float32)
            kw_p = tl.load(k_w_ptr + partner).to(tl.float32)
        return cos, sin, qw, qw_p, kw, kw_p

    globals().update(page_kv=load_page, pages_kv=load_pages, attend_page=attend, rope_norm_inputs=rope_inputs)

    @triton.jit
    def split_decode(
        q_ptr,
        q_stride,
        q_w_ptr,
        k_w_ptr,
        cos_sin_ptr,
        rope_pos_ptr,
        eps,
        cache_ptr,
        indptr_ptr,
        indices_ptr,
        last_ptr,
        part_o_ptr,
        part_m_ptr,
        part_l_ptr,
        counter_ptr,
        out_ptr,
        lse_ptr,
        q_out_ptr,
        scale_log2,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        G: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        S: tl.constexpr,
        PDL: tl.constexpr,
        MIN_PAGES: tl.constexpr,
        MEAN_CHUNK: tl.constexpr,
        ONE_SPLIT_PAGES: tl.constexpr,
        FUSED: tl.constexpr,
        NORM: tl.constexpr,
        LSE: tl.constexpr,
        STORE_Q: tl.constexpr,
        PRELOAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # The page table is copied in before the step's graph starts: it can be read before the PDL wait.
        start = tl.load(indptr_ptr + b)
        num_pages = tl.load(indptr_ptr + b + 1) - start
        per_split = tl.maximum(tl.cdiv(num_pages, S), MIN_PAGES)
        if MEAN_CHUNK:
            # Splits of at least the batch's mean context (indptr[rows] pages over rows): contexts up to the mean
            # take one program per KV head and no merge, a long one still up to S (see SplitDecode).
            rows = tl.num_programs(0)
            per_split = tl.maximum(per_split, tl.cdiv(tl.load(indptr_ptr + rows), rows))
        if num_pages <= ONE_SPLIT_PAGES:
            per_split = tl.maximum(num_pages, 1)  # one program per head: no partial states, no merge
        active = tl.cdiv(num_pages, per_split)
        # Splits past the context have nothing to do: they leave at once, and the merge covers `active` splits.
        if split < active:
            first = split * per_split
            stop = tl.minimum(first + per_split, num_pages)
            g = tl.arange(0, BLOCK_G)
            d = tl.arange(0, D)
            t = tl.arange(0, BS)
            partner = (d + D // 2) % D  # FUSED: each element's rotation partner, d +- D/2
            if PRELOAD:
                # FUSED only: the pages then hold K/V of earlier steps alone (this step's slot is written below and
                # masked in the page loop), which no kernel of this step writes. So the split's first page, like
                # the graph's inputs and the weights, can be loaded before the wait, while the QKV projection runs.
                if PRELOAD == 1:
                    k_first, v_first = page_kv(cache_ptr, indices_ptr, start + first, kvh, t, d, HKV, BS, D)
                else:
                    tp = tl.arange(0, PRELOAD * BS)
                    k_first, v_first = pages_kv(
                        cache_ptr, indices_ptr, start + first, stop - first, kvh, tp, d, HKV, BS, D
                    )
                cos, sin, qw, qw_p, kw, kw_p = rope_norm_inputs(
                    q_w_ptr, k_w_ptr, cos_sin_ptr, rope_pos_ptr, b, d, partner, D, NORM
                )
                last_len = tl.load(last_ptr + b)
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
                tl.extra.cuda.gdc_wait()  # q and the appended K/V are written by the kernel before
            if not PRELOAD:
                last_len = tl.load(last_ptr + b)
            live = g < G
            heads = b * HQ + kvh * G + g  # row of each query head in q [B * HQ, D]
            m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
            if FUSED:
                # q_ptr is this step's QKV projection: q/k RMSNorm and NeoX rope happen here, on full rows (each
                # element with its rotation partner, d +- D/2), so no kernel between the projection and attention.
                row = q_ptr + b * q_stride
                if not PRELOAD:
                    cos, sin, qw, qw_p, kw, kw_p = rope_norm_inputs(
                        q_w_ptr, k_w_ptr, cos_sin_ptr, rope_pos_ptr, b, d, partner, D, NORM
                    )
                q_cols = (kvh * G + g)[:, None] * D
                xq = tl.load(row + q_cols + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                xq_p = tl.load(row + q_cols + partner[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                k_row = row + (HQ + kvh) * D
                xk = tl.load(k_row + d).to(tl.float32)
                xk_p = tl.load(k_row + partner).to(tl.float32)
                if NORM:
                    rq = tl.rsqrt(tl.sum(xq * xq, 1) / D + eps)[:, None]
                    xq = xq * rq * qw[None, :]
                    xq_p = xq_p * rq * qw_p[None, :]
                    rk = tl.rsqrt(tl.sum(xk * xk, 0) / D + eps)
                    xk = xk * rk * kw
                    xk_p = xk_p * rk * kw_p
                q = (xq * cos[None, :] + xq_p * sin[None, :]).to(cache_ptr.dtype.element_ty)
                if STORE_Q:  # cascade: the shared level attends with the same normed, rotated q
                    if split == 0:
                        tl.store(q_out_ptr + heads[:, None] * D + d[None, :], q, mask=live[:, None])
                k_new = (xk * cos + xk_p * sin).to(cache_ptr.dtype.element_ty)
                v_new = tl.load(row + (HQ + HKV + kvh) * D + d)
                if split == active - 1:
                    # The split with the last page appends the step's K/V there and counts the new token from
                    # registers; the page loop skips its slot, which no other program reads.
                    page = tl.load(indices_ptr + start + num_pages - 1).to(tl.int64)
                    slot = cache_ptr + ((page * 2 * HKV + kvh) * BS + last_len - 1) * D + d
                    tl.store(slot, k_new)
                    tl.store(slot + HKV * BS * D, v_new)
                    m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale_log2
                    l_sum = tl.full([BLOCK_G], 1.0, dtype=tl.float32)
                    acc = acc + v_new.to(tl.float32)[None, :]
                last_valid = last_len - 1
            else:
                q = tl.load(q_ptr + heads[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
                last_valid = last_len
            p_start = first
            if PRELOAD == 1:
                valid = tl.where(first == num_pages - 1, last_valid, BS)
                m, l_sum, acc = attend_page(q, k_first, v_first, valid, t, m, l_sum, acc, scale_log2)
                p_start = first + 1
            elif PRELOAD:
                # The tile's tokens up to the split's end or the last page's earlier ones, whichever comes first.
                preloaded = tl.minimum(stop - first, PRELOAD)
                valid = tl.minimum(preloaded * BS, (num_pages - 1 - first) * BS + last_valid)
                m, l_sum, acc = attend_page(q, k_first, v_first, valid, tp, m, l_sum, acc, scale_log2)
                p_start = first + preloaded
            for p in range(p_start, stop):
                k, v = page_kv(cache_ptr, indices_ptr, start + p, kvh, t, d, HKV, BS, D)
                valid = tl.where(p == num_pages - 1, last_valid, BS)
                m, l_sum, acc = attend_page(q, k, v, valid, t, m, l_sum, acc, scale_log2)
            if active == 1:
                # One split holds the whole context: its state is the answer, no partial store or merge.
                o = acc / l_sum[:, None]
                tl.store(out_ptr + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=live[:, None])
                if LSE:  # base-2 log-sum-exp of the scaled scores, as FlashInfer's states carry it
                    tl.store(lse_ptr + heads, m + tl.log2(l_sum), mask=live)
            else:
                part = heads * S + split
                tl.store(part_o_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None])
                tl.store(part_m_ptr + part, m, mask=live)
                tl.store(part_l_ptr + part, l_sum, mask=live)
                # Every thread's partial stores happen before the (release) arrival; the last arrival merges.
                tl.debug_barrier()
                arrived = tl.atomic_add(counter_ptr + b * HKV + kvh, 1, sem="acq_rel")
                if arrived == active - 1:
                    splits = tl.arange(0, S)
                    used = splits < active
                    for gi in tl.static_range(G):
                        h = b * HQ + kvh * G + gi
                        ms = tl.load(part_m_ptr + h * S + splits, mask=used, other=float("-inf"), cache_modifier=".cg")
                        ls = tl.load(part_l_ptr + h * S + splits, mask=used, other=0.0, cache_modifier=".cg")
                        os_ = tl.load(
                            part_o_ptr + (h * S + splits)[:, None] * D + d[None, :],
                            mask=used[:, None],
                            other=0.0,
                            cache_modifier=".cg",
                        )
                        m_all = tl.max(ms, axis=0)
                        w = tl.exp2(ms - m_all)  # unused splits have m = -inf: weight 0
                        l_all = tl.sum(w * ls, axis=0)
                        o = tl.sum(w[:, None] * os_, axis=0) / l_all
                        tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty))
                        if LSE:
                            tl.store(lse_ptr + h, m_all + tl.log2(l_all))
                    tl.store(counter_ptr + b * HKV + kvh, 0)  # ready for the next layer's launch

    return split_decode


def split_buffers(partials: int, counters: int, head_dim: int, device) -> tuple:
    """Partial states (output, max, sum) for `partials` (row, head, split) triples and zeroed arrival counters for
    `counters` (row, KV head) pairs."""
    return (
        torch.empty(partials, head_dim, dtype=torch.float32, device=device),
        torch.empty(partials, dtype=torch.float32, device=device),
        torch.empty(partials, dtype=torch.float32, device=device),
        torch.zeros(counters, dtype=torch.int32, device=device),
    )


class SplitDecode:
    """The kernel's fixed buffers for one captured batch size (partial states and arrival counters)."""

    def __init__(
        self,
        rows: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        device,
        num_sms: int,
        splits: int | None = None,
        buffers: tuple | None = None,
        mean_chunk: bool = False,
    ):
        """splits: most splits per request (a power of two), by default about two programs per SM; buffers: from
        split_buffers() for at least this many rows and splits, shared by kernels that never run at once;
        mean_chunk: no split shorter than the batch's mean context (large batches, where each request's KV
        already has one program per KV head and splitting short contexts only adds partial states and merges)."""
        self.rows, self.hq, self.hkv, self.d = rows, num_heads, num_kv_heads, head_dim
        if splits is None:
            # About two programs per SM; a power of two so the merge can tile the splits.
            want = max(1, min(MAX_SPLITS, 2 * num_sms // (rows * num_kv_heads)))
            splits = 1 << (want.bit_length() - 1)
        if splits & (splits - 1) or not 1 <= splits <= MAX_SPLITS:
            raise ValueError(f"splits={splits} must be a power of two from 1 to {MAX_SPLITS}")
        self.splits = splits
        n = rows * num_heads * splits
        part_o, part_m, part_l, counter = buffers or split_buffers(n, rows * num_kv_heads, head_dim, device)
        if part_m.numel() < n or counter.numel() < rows * num_kv_heads:
            raise ValueError(f"shared buffers hold {part_m.numel()} partial states, {n} needed")
        self.part_o, self.part_m, self.part_l = part_o[:n], part_m[:n], part_l[:n]
        self.counter = counter[: rows * num_kv_heads]
        self.scale_log2 = math.log2(math.e) / math.sqrt(head_dim)
        value = os.environ.get("NANOVLLM_ATTN_MIN_PAGES", str(MIN_PAGES_PER_SPLIT))
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"NANOVLLM_ATTN_MIN_PAGES={value!r} must be a whole number of pages, at least 1")
        self.min_pages = int(value)
        self.one_split_pages = ONE_SPLIT_PAGES
        self.mean_chunk = mean_chunk
        self.compiled = None  # the kernel of the last launch (resident_per_sm)

    def resident_per_sm(self) -> int | None:
        """Programs of the kernel as last launched that one SM holds at once (None before a launch, or where the
        driver cannot say): where rows x KV heads passes that many per SM, a second wave starts."""
        return resident_programs(self.compiled) if self.compiled is not None else None

    def __call__(self, q, kv_cache, kv_indptr, kv_indices, kv_last) -> torch.Tensor:
        """Attention of q [rows, Hq, D] over the paged HND cache [pages, 2, Hkv, BS, D] given by the page table."""
        out = torch.empty_like(q)
        self._launch(q, 0, None, None, 0.0, None, None, kv_cache, kv_indptr, kv_indices, kv_last, out)
        return out

    def with_lse(self, q, kv_cache, kv_indptr, kv_indices, kv_last) -> tuple[torch.Tensor, torch.Tensor]:
        """As calling it, also returning each row and head's base-2 log-sum-exp [rows, Hq] (float32), the state
        FlashInfer's merge_state_in_place takes (cascade attention merges it with the shared level's)."""
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
        self._launch(q, 0, None, None, 0.0, None, None, kv_cache, kv_indptr, kv_indices, kv_last, out, lse)
        return out, lse

    def fused(
        self,
        qkv,
        q_norm_weight,
        k_norm_weight,
        eps,
        cos_sin,
        rope_positions,
        kv_cache,
        kv_indptr,
        kv_indices,
        kv_last,
        states: bool = False,
    ):
        """Attention of each row's step token given its QKV projection [rows, (Hq + 2 Hkv) * D]: q/k norm (when
        weights are given) and NeoX rope by rope_positions, the K/V append at the last slot of each row's pages
        (kv_last tokens in its last page, the new one included), and attention, in one launch; returns [rows, Hq, D],
        or with states (cascade) (that, its base-2 log-sum-exp [rows, Hq], the normed and rotated q [rows, Hq, D])."""
        if qkv.stride(1) != 1:
            raise ValueError(f"the QKV projection must have contiguous rows (strides {qkv.stride()})")
        out = torch.empty(self.rows, self.hq, self.d, dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty(self.rows, self.hq, dtype=torch.float32, device=qkv.device) if states else None
        q = torch.empty_like(out) if states else None
        self._launch(
            qkv, qkv.stride(0), q_norm_weight, k_norm_weight, eps, cos_sin, rope_positions,
            kv_cache, kv_indptr, kv_indices, kv_last, out, lse, q,
        )  # fmt: skip
        return (out, lse, q) if states else out

    def _launch(
        self,
        q,
        q_stride,
        q_w,
        k_w,
        eps,
        cos_sin,
        rope_pos,
        kv_cache,
        kv_indptr,
        kv_indices,
        kv_last,
        out,
        lse=None,
        q_out=None,
    ):
        group = self.hq // self.hkv
        fused, norm = cos_sin is not None, q_w is not None
        preload = attn_preload_pages(self.rows) if fused else 0
        if preload > 1 and (lse is not None or self.mean_chunk):
            preload = 1  # measured for the small decode graphs only; cascade and the large twins keep a page
        launch = launch_options(q.device)  # launch_pdl where PDL is on; the kernel then waits (PDL=True)
        unused = q  # pointer arguments a constexpr branch never reads
        args = (
            q, q_stride, q_w if norm else unused, k_w if norm else unused, cos_sin if fused else unused,
            rope_pos if fused else unused, eps, kv_cache, kv_indptr, kv_indices, kv_last,
            self.part_o, self.part_m, self.part_l, self.counter, out,
            lse if lse is not None else self.part_l, q_out if q_out is not None else out, self.scale_log2,
        )  # fmt: skip
        options = dict(
            HQ=self.hq,
            HKV=self.hkv,
            G=group,
            BLOCK_G=max(16, 1 << (group - 1).bit_length()),  # a tensor-core tile has at least 16 rows
            D=self.d,
            BS=kv_cache.shape[3],
            S=self.splits,
            PDL=bool(launch),
            # A split holds at least its preloaded pages, and a context of that many pages takes one split.
            MIN_PAGES=max(self.min_pages, preload),
            MEAN_CHUNK=self.mean_chunk,
            ONE_SPLIT_PAGES=max(self.one_split_pages, preload),
            FUSED=fused,
            NORM=norm,
            LSE=lse is not None,
            STORE_Q=q_out is not None,
            PRELOAD=preload,
            num_warps=4 * max(preload, 1),  # a page's K/V tile per 4 warps: 256 bytes a thread held over the wait
            **launch,
        )
        kernel, grid = _build_kernel(), (self.rows, self.hkv, self.splits)
        if _deferred is not None:
            # Triton's compile key: the constexprs and options, and how the one integer argument specialises.
            key = (q_stride == 1, q_stride % 16 == 0, *options.items())
            _deferred.setdefault(key, functools.partial(kernel.warmup, *args, grid=grid, **options))
            return
        self.compiled = kernel[grid](*args, **options)
