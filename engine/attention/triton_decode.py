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
Cascade graphs use it for each request's own pages, where it also returns the base-2 log-sum-exp that FlashInfer's
merge takes and the rotated q for the shared level: at 64 requests with ~200 own tokens it reads them faster than
FlashInfer's tensor-core decode (22.7 against 29.1 us per layer timed alone, H100), and the cascade decode phase of
the shared-prefix benchmark ran 1.06-1.10x faster (docs/benchmarks.md, section 3).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from engine.layers.kernels import launch_options, triton_available

MAX_SPLITS = 32
# Fewest pages a split reads: 2 measured +4% and -1% in two A/Bs (H100, docs/benchmarks.md), not a clear gain.
# NANOVLLM_ATTN_MIN_PAGES overrides it (A/B runs); a context of at most that many pages takes one split.
MIN_PAGES_PER_SPLIT = 1
# A context of at most this many pages is attended by one program per KV head, which then stores its output
# directly. Measured in one engine (H100, 64-token pages, docs/benchmarks.md): at 2 pages the step takes 0.94 of
# its split time at batch 1 and 0.97 at batch 4-8; at 3 pages 0.99 at batch 1 but 1.02-1.03 at batch 4-8; from 4
# pages on one split loses.
ONE_SPLIT_PAGES = 2


def triton_decode_max_rows() -> int:
    """The largest decode batch served by this kernel (NANOVLLM_TRITON_DECODE_MAX_ROWS, default 8)."""
    value = os.environ.get("NANOVLLM_TRITON_DECODE_MAX_ROWS", "8")
    if not value.isdigit():
        raise ValueError(f"NANOVLLM_TRITON_DECODE_MAX_ROWS={value!r} must be a whole number of requests (0 = off)")
    return int(value)


def fused_decode_enabled() -> bool:
    """Whether decode graphs that use this kernel also fold the q/k norm, rope and K/V append into it
    (NANOVLLM_FUSED_DECODE, default 1; 0 keeps the separate fused q/k kernel before it)."""
    value = os.environ.get("NANOVLLM_FUSED_DECODE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"NANOVLLM_FUSED_DECODE={value!r} must be 0 or 1")
    return value == "1"


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
        sh_o_ptr,
        sh_lse_ptr,
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
        ONE_SPLIT_PAGES: tl.constexpr,
        FUSED: tl.constexpr,
        NORM: tl.constexpr,
        LSE: tl.constexpr,
        STORE_Q: tl.constexpr,
        SHARED: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        # The page table is copied in before the step's graph starts: it can be read before the PDL wait.
        start = tl.load(indptr_ptr + b)
        num_pages = tl.load(indptr_ptr + b + 1) - start
        per_split = tl.maximum(tl.cdiv(num_pages, S), MIN_PAGES)
        if num_pages <= ONE_SPLIT_PAGES:
            per_split = tl.maximum(num_pages, 1)  # one program per head: no partial states, no merge
        active = tl.cdiv(num_pages, per_split)
        # Splits past the context have nothing to do: they leave at once, and the merge covers `active` splits.
        if split < active:
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
                tl.extra.cuda.gdc_wait()  # q and the appended K/V are written by the kernel before
            last_len = tl.load(last_ptr + b)
            first = split * per_split
            stop = tl.minimum(first + per_split, num_pages)
            g = tl.arange(0, BLOCK_G)
            d = tl.arange(0, D)
            t = tl.arange(0, BS)
            live = g < G
            heads = b * HQ + kvh * G + g  # row of each query head in q [B * HQ, D]
            m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            l_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
            acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
            if FUSED:
                # q_ptr is this step's QKV projection: q/k RMSNorm and NeoX rope happen here, on full rows (each
                # element with its rotation partner, d +- D/2), so no kernel between the projection and attention.
                row = q_ptr + b * q_stride
                partner = (d + D // 2) % D
                q_cols = (kvh * G + g)[:, None] * D
                xq = tl.load(row + q_cols + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                xq_p = tl.load(row + q_cols + partner[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                k_row = row + (HQ + kvh) * D
                xk = tl.load(k_row + d).to(tl.float32)
                xk_p = tl.load(k_row + partner).to(tl.float32)
                if NORM:
                    rq = tl.rsqrt(tl.sum(xq * xq, 1) / D + eps)[:, None]
                    xq = xq * rq * tl.load(q_w_ptr + d).to(tl.float32)[None, :]
                    xq_p = xq_p * rq * tl.load(q_w_ptr + partner).to(tl.float32)[None, :]
                    rk = tl.rsqrt(tl.sum(xk * xk, 0) / D + eps)
                    xk = xk * rk * tl.load(k_w_ptr + d).to(tl.float32)
                    xk_p = xk_p * rk * tl.load(k_w_ptr + partner).to(tl.float32)
                pos = tl.load(rope_pos_ptr + b).to(tl.int64)
                cos = tl.load(cos_sin_ptr + pos * D + d % (D // 2))
                sin = tl.load(cos_sin_ptr + pos * D + D // 2 + d % (D // 2))
                sin = tl.where(d < D // 2, -sin, sin)  # first half: x1 cos - x2 sin; second: x2 cos + x1 sin
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
            for p in range(first, stop):
                page = tl.load(indices_ptr + start + p).to(tl.int64)
                # HND page [2, HKV, BS, D]: this head's K rows, then its V rows HKV * BS * D further.
                k_rows = cache_ptr + ((page * 2 * HKV + kvh) * BS + t)[:, None] * D + d[None, :]
                k = tl.load(k_rows)
                v = tl.load(k_rows + HKV * BS * D)
                scores = tl.dot(q, tl.trans(k)) * scale_log2
                valid = tl.where(p == num_pages - 1, last_valid, BS)
                scores = tl.where(t[None, :] < valid, scores, float("-inf"))
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                alpha = tl.exp2(m - m_new)
                probs = tl.exp2(scores - m_new[:, None])
                l_sum = l_sum * alpha + tl.sum(probs, axis=1)
                acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
                m = m_new
            if active == 1:
                # One split holds the whole context: its state is the answer, no partial store or merge (but the
                # shared prefix's chunks of a cascade step, when given).
                if SHARED > 0:
                    for c in tl.static_range(SHARED):
                        s_lse = tl.load(sh_lse_ptr + heads * SHARED + c, mask=live, other=float("-inf"))
                        s_o = tl.load(sh_o_ptr + (heads * SHARED + c)[:, None] * D + d[None, :], mask=live[:, None])
                        m_new = tl.maximum(m, s_lse)
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf
                        alpha = tl.exp2(m - m_safe)
                        w = tl.exp2(s_lse - m_safe)
                        l_sum = l_sum * alpha + w
                        acc = acc * alpha[:, None] + w[:, None] * s_o.to(tl.float32)
                        m = m_new
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
                        if SHARED > 0:
                            chunks = tl.arange(0, SHARED)
                            s_lse = tl.load(sh_lse_ptr + h * SHARED + chunks)
                            s_o = tl.load(sh_o_ptr + (h * SHARED + chunks)[:, None] * D + d[None, :])
                            m_all = tl.maximum(m_all, tl.max(s_lse, axis=0))
                        w = tl.exp2(ms - m_all)  # unused splits have m = -inf: weight 0
                        l_all = tl.sum(w * ls, axis=0)
                        o = tl.sum(w[:, None] * os_, axis=0)
                        if SHARED > 0:
                            w_s = tl.exp2(s_lse - m_all)  # empty chunks have lse = -inf: weight 0
                            l_all += tl.sum(w_s, axis=0)
                            o += tl.sum(w_s[:, None] * s_o.to(tl.float32), axis=0)
                        o = o / l_all
                        tl.store(out_ptr + h * D + d, o.to(out_ptr.dtype.element_ty))
                        if LSE:
                            tl.store(lse_ptr + h, m_all + tl.log2(l_all))
                    tl.store(counter_ptr + b * HKV + kvh, 0)  # ready for the next layer's launch

    return split_decode


@functools.cache
def _build_shared_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def shared_chunks(
        qkv_ptr,
        q_stride,
        q_w_ptr,
        eps,
        cos_sin_ptr,
        rope_pos_ptr,
        cache_ptr,
        pages_ptr,
        rows,
        sh_o_ptr,
        sh_lse_ptr,
        scale_log2,
        HQ: tl.constexpr,
        G: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        HKV: tl.constexpr,
        C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        NORM: tl.constexpr,
        PDL: tl.constexpr,
    ):
        kvh = tl.program_id(0)
        c = tl.program_id(1)
        tile = tl.program_id(2)
        # pages_ptr[0] is the number of shared pages, their ids follow; set before the step's graph starts.
        n = tl.load(pages_ptr)
        per = tl.cdiv(n, C)
        first = c * per
        stop = tl.minimum(first + per, n)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # the QKV projection is written by the kernel before
        # Query rows (request, head of this KV head's group), each normed and rotated as the own level does.
        r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        b = r // G
        live = b < rows
        d = tl.arange(0, D)
        t = tl.arange(0, BS)
        partner = (d + D // 2) % D
        heads = b * HQ + kvh * G + r % G
        row = qkv_ptr + b.to(tl.int64)[:, None] * q_stride + ((kvh * G + r % G) * D)[:, None]
        xq = tl.load(row + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        xq_p = tl.load(row + partner[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        if NORM:
            rq = tl.rsqrt(tl.sum(xq * xq, 1) / D + eps)[:, None]
            xq = xq * rq * tl.load(q_w_ptr + d).to(tl.float32)[None, :]
            xq_p = xq_p * rq * tl.load(q_w_ptr + partner).to(tl.float32)[None, :]
        pos = tl.load(rope_pos_ptr + b, mask=live, other=0).to(tl.int64)[:, None]
        cos = tl.load(cos_sin_ptr + pos * D + (d % (D // 2))[None, :])
        sin = tl.load(cos_sin_ptr + pos * D + D // 2 + (d % (D // 2))[None, :])
        sin = tl.where(d[None, :] < D // 2, -sin, sin)
        q = (xq * cos + xq_p * sin).to(cache_ptr.dtype.element_ty)
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, D], dtype=tl.float32)
        for p in range(first, stop):
            # Shared pages are whole: every slot holds a token of the prefix.
            page = tl.load(pages_ptr + 1 + p).to(tl.int64)
            k_rows = cache_ptr + ((page * 2 * HKV + kvh) * BS + t)[:, None] * D + d[None, :]
            k = tl.load(k_rows)
            v = tl.load(k_rows + HKV * BS * D)
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            probs = tl.exp2(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            m = m_new
        # Each chunk's state as (normalised output, base-2 log-sum-exp); an empty chunk has lse = -inf, output 0.
        o = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        part = heads * C + c
        tl.store(sh_lse_ptr + part, m + tl.log2(l_sum), mask=live)
        tl.store(sh_o_ptr + part[:, None] * D + d[None, :], o.to(sh_o_ptr.dtype.element_ty), mask=live[:, None])

    return shared_chunks


class SharedChunks:
    """Cascade's shared level as chunks of the shared pages, each attended by all the step's queries at once.

    Why: FlashInfer's shared level is a prefill kernel, a merge of its splits and a merge with the own level: three
    launches per layer (12.9 + 9.0 us of the shared-prefix benchmark's 53.8 us of attention per layer on an H100,
    docs/benchmarks.md). Here one kernel reads each chunk once for every request and stores one state per chunk;
    the split-KV kernel of the own pages folds those states into its own before it stores the output."""

    def __init__(self, rows: int, num_heads: int, num_kv_heads: int, head_dim: int, max_pages: int, device, chunks):
        """chunks: the shared pages are split into this many (a power of two); max_pages: most shared pages."""
        if chunks & (chunks - 1) or chunks < 1:
            raise ValueError(f"chunks={chunks} must be a power of two")
        self.rows, self.hq, self.hkv, self.d, self.chunks = rows, num_heads, num_kv_heads, head_dim, chunks
        n = rows * num_heads * chunks
        self.out = torch.empty(n, head_dim, dtype=torch.bfloat16, device=device)
        self.lse = torch.empty(n, dtype=torch.float32, device=device)
        self.pages = torch.zeros(max_pages + 1, dtype=torch.int32, device=device)  # [count, page ids...]
        self._host = torch.zeros(max_pages + 1, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        self._sent: list[int] | None = None
        self.scale_log2 = math.log2(math.e) / math.sqrt(head_dim)

    def set_pages(self, pages: list[int]) -> None:
        """The step's shared pages (whole ones), copied to the device when they differ from the last step's (the
        same requests keep the same prefix); the pinned buffer is rewritten only after the step that read it has
        consumed its inputs, as StagedTables is."""
        if pages == self._sent:
            return
        if len(pages) + 1 > self._host.numel():
            raise ValueError(f"{len(pages)} shared pages, room for {self._host.numel() - 1}")
        self._host[0] = len(pages)
        self._host[1 : len(pages) + 1] = torch.tensor(pages, dtype=torch.int32)
        self.pages[: len(pages) + 1].copy_(self._host[: len(pages) + 1], non_blocking=True)
        self._sent = list(pages)

    def states(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(outputs, base-2 log-sum-exps, chunks) as SplitDecode.fused takes them."""
        return self.out, self.lse, self.chunks

    def __call__(self, qkv, q_norm_weight, eps, cos_sin, rope_positions, kv_cache) -> None:
        """Attend each row's normed, rotated q (from the QKV projection) over every chunk of the shared pages."""
        group = self.hq // self.hkv
        most = int(os.environ.get("NANOVLLM_CASCADE_SHARED_ROWS", "128"))  # A/B knob: query rows per program
        block_r = max(16, min(most, 1 << (self.rows * group - 1).bit_length()))
        launch = launch_options(qkv.device)
        grid = (self.hkv, self.chunks, -(-self.rows * group // block_r))
        _build_shared_kernel()[grid](
            qkv, qkv.stride(0), q_norm_weight if q_norm_weight is not None else qkv, eps, cos_sin, rope_positions,
            kv_cache, self.pages, self.rows, self.out, self.lse, self.scale_log2,
            HQ=self.hq, G=group, D=self.d, BS=kv_cache.shape[3], HKV=self.hkv, C=self.chunks, BLOCK_R=block_r,
            NORM=q_norm_weight is not None, PDL=bool(launch), num_warps=8 if block_r >= 128 else 4, **launch,
        )  # fmt: skip


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
    ):
        """splits: most splits per request (a power of two), by default about two programs per SM; buffers: from
        split_buffers() for at least this many rows and splits, shared by kernels that never run at once."""
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
        shared: tuple | None = None,
    ):
        """Attention of each row's step token given its QKV projection [rows, (Hq + 2 Hkv) * D]: q/k norm (when
        weights are given) and NeoX rope by rope_positions, the K/V append at the last slot of each row's pages
        (kv_last tokens in its last page, the new one included), and attention, in one launch; returns [rows, Hq, D],
        or with states (cascade) (that, its base-2 log-sum-exp [rows, Hq], the normed and rotated q [rows, Hq, D]);
        shared: SharedChunks.states() of a cascade step, merged into each row's output."""
        if qkv.stride(1) != 1:
            raise ValueError(f"the QKV projection must have contiguous rows (strides {qkv.stride()})")
        out = torch.empty(self.rows, self.hq, self.d, dtype=qkv.dtype, device=qkv.device)
        lse = torch.empty(self.rows, self.hq, dtype=torch.float32, device=qkv.device) if states else None
        q = torch.empty_like(out) if states else None
        self._launch(
            qkv, qkv.stride(0), q_norm_weight, k_norm_weight, eps, cos_sin, rope_positions,
            kv_cache, kv_indptr, kv_indices, kv_last, out, lse, q, shared,
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
        shared=None,
    ):
        group = self.hq // self.hkv
        fused, norm = cos_sin is not None, q_w is not None
        launch = launch_options(q.device)  # launch_pdl where PDL is on; the kernel then waits (PDL=True)
        unused = q  # pointer arguments a constexpr branch never reads
        _build_kernel()[(self.rows, self.hkv, self.splits)](
            q,
            q_stride,
            q_w if norm else unused,
            k_w if norm else unused,
            cos_sin if fused else unused,
            rope_pos if fused else unused,
            eps,
            kv_cache,
            kv_indptr,
            kv_indices,
            kv_last,
            self.part_o,
            self.part_m,
            self.part_l,
            self.counter,
            out,
            lse if lse is not None else self.part_l,
            q_out if q_out is not None else out,
            shared[0] if shared else out,
            shared[1] if shared else self.part_l,
            self.scale_log2,
            HQ=self.hq,
            HKV=self.hkv,
            G=group,
            BLOCK_G=max(16, 1 << (group - 1).bit_length()),  # a tensor-core tile has at least 16 rows
            D=self.d,
            BS=kv_cache.shape[3],
            S=self.splits,
            PDL=bool(launch),
            MIN_PAGES=self.min_pages,
            ONE_SPLIT_PAGES=self.one_split_pages,
            FUSED=fused,
            NORM=norm,
            LSE=lse is not None,
            STORE_Q=q_out is not None,
            SHARED=shared[2] if shared else 0,
            num_warps=4,
            **launch,
        )
