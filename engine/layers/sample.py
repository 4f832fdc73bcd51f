"""Token sampling on the GPU in Triton kernels: greedy, temperature sampling by the Gumbel-max trick, and top-k /
top-p / min-p filters found by a radix select instead of a sort.

Why: torch's sampling path is a chain of kernels over the [rows, vocab] logits (a float copy, softmax, exponential
noise, a division, two argmaxes, a select), each reading and writing the whole vocabulary, and even greedy's argmax
over 151,936 logits ran 12.7 us per step at batch 1 (H200, docs/benchmarks.md). Here each program reads one chunk of
a row once, adds Gumbel noise drawn from Philox (tl.rand) to logits / temperature, and keeps the chunk's best; the
last program of a row to arrive (an atomic counter, acquire-release, as in the split-KV attention) picks the row's
token. argmax(logits / T + Gumbel) is a draw from softmax(logits / T), the same race as torch's path
(probs / exponential noise), without the softmax.

The noise of row r at vocabulary index i is Philox(seed of r's request, counter (token index << 32) + i): a
request's draws depend on its seed and how many tokens it has, not on the batch it shares or on the step timing.

Filters (top-k, top-p, min-p) keep every token whose value is at least a row's cut-off, so a tie at the cut-off is kept
whole (as HF's and vLLM's top-k; engine/sampler.py's torch path keeps the same set). torch's path sorts the whole
vocabulary per step (top-p 0.9 decoded at 0.67-0.79x greedy's speed; 0.97x here, docs/benchmarks.md section 11). Here
the cut-off is found on the 16-bit float's bits, an exact order key for bf16 and fp16 logits, in two passes before the
sampling pass: the first counts the tokens and their probability mass in 64 buckets of the key's top 6 bits and finds
the bucket that holds the cut-off; the second counts that bucket's tokens by the key's low 10 bits (one value each, so
their mass is the count times the value's probability) and finds the cut-off value. Min-p needs no search: its cut-off
is max + T ln(min_p). Logprobs and float32 logits keep the torch path. NANOVLLM_FUSED_SAMPLE=0 turns these kernels off.
"""

from __future__ import annotations

import functools

import torch

from engine.config import env_choice
from engine.layers.kernels import triton_available

BLOCK = 4096  # vocabulary entries per program: 38 programs per row for Qwen3's 151,936
FILTER_BLOCK = 2048  # the bucket pass's vocabulary entries per program
WARPS = 8
NOT_FOUND = 2**31 - 1  # an index larger than any vocabulary's: loses every tie
SHIFT = 10  # the 16-bit key: 6 bits of bucket, 10 bits of value within it
BUCKETS = 1 << (16 - SHIFT)  # at most 64: the bucket pass marks the occupied ones in an int64
BINS = 1 << SHIFT
FILTER_DTYPES = (torch.bfloat16, torch.float16)
NO_TOP_K = 2**31 - 1


def fused_sample_enabled(device: torch.device) -> bool:
    """Whether sampling on this device runs in the Triton kernels (NANOVLLM_FUSED_SAMPLE, "1" by default)."""
    return env_choice("NANOVLLM_FUSED_SAMPLE", "1", ("0", "1")) == "1" and device.type == "cuda" and triton_available()


@functools.cache
def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rank_of(raw):
        # A 16-bit float's bits as an order key, 0 for the largest value (+inf), so that a prefix sum over keys
        # counts from the top. Negative floats order by magnitude, backwards.
        bits = raw.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.where(bits >= 0x8000, bits, 0x7FFF - bits)

    @triton.jit
    def row_temperature(params_ptr, rows, row):
        return tl.load(params_ptr + 2 * rows + row).to(tl.int32).to(tl.float32, bitcast=True)

    @triton.jit
    def row_filters(params_ptr, rows, row):
        top_k = tl.load(params_ptr + 3 * rows + row)
        top_p = tl.load(params_ptr + 4 * rows + row).to(tl.int32).to(tl.float32, bitcast=True)
        return top_k, top_p

    @triton.jit
    def kept_from_top(count, mass, count_above, mass_above, top_k, top_p, total):
        # Per key range, counted from the top: whether its largest value survives top-k and top-p, given the tokens
        # and mass above the first range. A value survives when fewer than top_k tokens and less than top_p of the
        # mass lie strictly above it (torch's rule, engine/sampler.py).
        above_c = count_above + tl.cumsum(count, axis=0) - count
        above_m = mass_above + tl.cumsum(mass, axis=0) - mass
        limit = tl.where(top_p >= 1.0, float("inf"), top_p * total)  # top-p 1: every token, even of no mass
        ok = (count > 0) & (above_c < top_k) & (above_m < limit)
        return ok, above_c, above_m

    # Triton resolves a kernel's helpers among its module's globals, not the builder's locals (as in gemv.py).
    globals().update(rank_of=rank_of, row_temperature=row_temperature, row_filters=row_filters,
                     kept_from_top=kept_from_top)  # fmt: skip

    # The row and chunk counts vary per step: specialised on divisibility by 16, a step of 16 rows would compile
    # another variant in the middle of serving.
    @triton.jit(do_not_specialize=["rows", "chunks"])
    def sample_kernel(
        logits_ptr,
        stride,
        params_ptr,
        best_ptr,
        where_ptr,
        counter_ptr,
        out_ptr,
        rowf_ptr,
        rowi_ptr,
        rows,
        V,
        chunks,
        BLOCK: tl.constexpr,
        CHUNKS_P2: tl.constexpr,
        SAMPLE: tl.constexpr,
        FILTER: tl.constexpr,
        NOT_FOUND: tl.constexpr,
    ):
        # Program (row, chunk): the best score of logits[row, chunk * BLOCK:][:BLOCK] and where it is; params holds
        # per row (seed, token index, temperature's float32 bits, ...) as int64 rows of `rows` entries (SAMPLE only).
        # FILTER: tokens below the row's cut-offs (rowi[row, 2]: the rank key; rowf[row, 3]: the min-p floor of
        # logits / T) score -inf.
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        raw = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf"))
        x = raw.to(tl.float32)
        if SAMPLE:
            temp = row_temperature(params_ptr, rows, row)
            if temp > 0.0:  # temperature 0: greedy, no noise; the maximum survives every filter
                seed = tl.load(params_ptr + row)
                counter = (tl.load(params_ptr + rows + row) << 32) + cols.to(tl.int64)
                u = tl.rand(seed, counter)  # [0, 1): u = 0 scores -inf, never chosen
                x = x / tl.maximum(temp, 1e-5)
                if FILTER:
                    keep = (rank_of(raw) <= tl.load(rowi_ptr + 4 * row + 2)) & (x >= tl.load(rowf_ptr + 4 * row + 3))
                    x = tl.where(keep, x, float("-inf"))
                x = x - tl.log(-tl.log(u))
        best = tl.max(x, axis=0)
        tl.store(best_ptr + row * chunks + chunk, best)
        tl.store(where_ptr + row * chunks + chunk, chunk * BLOCK + tl.argmax(x, axis=0))  # first of ties, as torch
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if arrived == chunks - 1:
            # The row's last program: the highest score, the lowest index among ties (as torch.argmax).
            offs = tl.arange(0, CHUNKS_P2)
            live = offs < chunks
            scores = tl.load(best_ptr + row * chunks + offs, mask=live, other=float("-inf"), cache_modifier=".cg")
            index = tl.load(where_ptr + row * chunks + offs, mask=live, other=NOT_FOUND, cache_modifier=".cg")
            top = tl.max(scores, axis=0)
            token = tl.min(tl.where(live & (scores == top), index, NOT_FOUND), axis=0)
            tl.store(out_ptr + row, token.to(tl.int64))
            tl.store(counter_ptr + row, 0)  # ready for the next launch

    @triton.jit(do_not_specialize=["rows", "chunks"])
    def bucket_kernel(
        logits_ptr,
        stride,
        params_ptr,
        top_ptr,
        mass_ptr,
        count_ptr,
        counter_ptr,
        rowf_ptr,
        rowi_ptr,
        rows,
        V,
        chunks,
        BLOCK: tl.constexpr,
        SHIFT: tl.constexpr,
        BUCKETS: tl.constexpr,
        CHUNKS_P2: tl.constexpr,
    ):
        # Program (row, chunk): the chunk's maximum of logits / T, and per bucket of the rank key's top bits its
        # token count and mass exp(logits / T - that maximum). The row's last program adds them up (rescaled to
        # the row's maximum) and writes rowf[row] = (max, total mass, mass above the cut-off's bucket, min-p
        # floor), rowi[row] = (the cut-off's bucket, tokens above it).
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        temp = tl.maximum(row_temperature(params_ptr, rows, row), 1e-5)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        valid = cols < V
        raw = tl.load(base + cols, mask=valid, other=float("-inf"))
        x = raw.to(tl.float32) / temp
        top = tl.max(x, axis=0)
        e = tl.exp(x - tl.where(top == float("-inf"), 0.0, top))  # a chunk of banned tokens: 0, not nan
        bucket = rank_of(raw) >> SHIFT
        counts = tl.histogram(bucket, BUCKETS, mask=valid)
        # tl.histogram counts but cannot weigh: one masked sum per bucket that holds any of the chunk's tokens.
        # Logits span a few binades and a bucket spans eight, so few buckets hold any; the others are skipped by a
        # bit mask of the occupied ones.
        buckets = tl.arange(0, BUCKETS)
        occupied = tl.sum(tl.where(counts > 0, tl.full([BUCKETS], 1, tl.int64) << buckets.to(tl.int64), 0), axis=0)
        mass = tl.zeros([BUCKETS], dtype=tl.float32)
        for b in range(0, BUCKETS):
            if ((occupied >> b) & 1) != 0:
                mass = tl.where(buckets == b, tl.sum(tl.where(bucket == b, e, 0.0), axis=0), mass)
        slot = row * chunks + chunk
        tl.store(top_ptr + slot, top)
        tl.store(mass_ptr + slot * BUCKETS + buckets, mass)
        tl.store(count_ptr + slot * BUCKETS + buckets, counts)
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if arrived == chunks - 1:
            offs = tl.arange(0, CHUNKS_P2)
            live = offs < chunks
            tops = tl.load(top_ptr + row * chunks + offs, mask=live, other=float("-inf"), cache_modifier=".cg")
            high = tl.max(tops, axis=0)
            high = tl.where(high == float("-inf"), 0.0, high)
            tile = (row * chunks + offs)[:, None] * BUCKETS + buckets[None, :]
            masses = tl.load(mass_ptr + tile, mask=live[:, None], other=0.0, cache_modifier=".cg")
            mass = tl.sum(masses * tl.exp(tops - high)[:, None], axis=0)
            count = tl.sum(tl.load(count_ptr + tile, mask=live[:, None], other=0, cache_modifier=".cg"), axis=0)
            total = tl.sum(mass, axis=0)
            top_k, top_p = row_filters(params_ptr, rows, row)
            ok, above_c, above_m = kept_from_top(count, mass, 0, 0.0, top_k, top_p, total)
            # The last bucket whose largest value survives holds the cut-off (the row's maximum always survives).
            cut = tl.maximum(tl.max(tl.where(ok, buckets, -1), axis=0), 0)
            at = buckets == cut
            min_p = tl.load(params_ptr + 5 * rows + row).to(tl.int32).to(tl.float32, bitcast=True)
            tl.store(rowf_ptr + 4 * row, high)
            tl.store(rowf_ptr + 4 * row + 1, total)
            tl.store(rowf_ptr + 4 * row + 2, tl.sum(tl.where(at, above_m, 0.0), axis=0))
            tl.store(rowf_ptr + 4 * row + 3, high + tl.log(min_p))  # min_p 0: -inf, no floor
            tl.store(rowi_ptr + 4 * row, cut)
            tl.store(rowi_ptr + 4 * row + 1, tl.sum(tl.where(at, above_c, 0), axis=0))
            tl.store(counter_ptr + row, 0)

    @triton.jit(do_not_specialize=["rows", "chunks"])
    def bin_kernel(
        logits_ptr,
        stride,
        params_ptr,
        bins_ptr,
        counter_ptr,
        rowf_ptr,
        rowi_ptr,
        rows,
        V,
        chunks,
        BLOCK: tl.constexpr,
        SHIFT: tl.constexpr,
    ):
        # Program (row, chunk): counts of the chunk's tokens in the cut-off's bucket by the key's low bits, added
        # into the row's bins. The row's last program finds the cut-off key (rowi[row, 2]) and clears the bins.
        BINS: tl.constexpr = 1 << SHIFT
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        valid = cols < V
        raw = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=valid, other=float("-inf"))
        rank = rank_of(raw)
        cut = tl.load(rowi_ptr + 4 * row)
        counts = tl.histogram(rank & (BINS - 1), BINS, mask=valid & ((rank >> SHIFT) == cut))
        bins = tl.arange(0, BINS)
        tl.atomic_add(bins_ptr + row * BINS + bins, counts, mask=counts > 0, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
        if arrived == chunks - 1:
            count = tl.load(bins_ptr + row * BINS + bins, cache_modifier=".cg")
            keys = (cut << SHIFT) | bins
            # Each bin is one value: its mass is the count times exp(value / T - max).
            bits = tl.where(keys >= 0x8000, keys, 0x7FFF - keys).to(tl.int16)
            value = bits.to(logits_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            temp = tl.maximum(row_temperature(params_ptr, rows, row), 1e-5)
            # (Empty bins' keys may decode to inf or nan: their exponent is taken at 0.)
            scaled = tl.where(count > 0, value / temp - tl.load(rowf_ptr + 4 * row), 0.0)
            mass = tl.where(count > 0, count * tl.exp(scaled), 0.0)
            top_k, top_p = row_filters(params_ptr, rows, row)
            ok, _, _ = kept_from_top(
                count,
                mass,
                tl.load(rowi_ptr + 4 * row + 1),
                tl.load(rowf_ptr + 4 * row + 2),
                top_k,
                top_p,
                tl.load(rowf_ptr + 4 * row + 1),
            )
            tl.store(rowi_ptr + 4 * row + 2, (cut << SHIFT) + tl.max(tl.where(ok, bins, -1), axis=0))
            tl.store(bins_ptr + row * BINS + bins, tl.zeros([BINS], dtype=tl.int32))
            tl.store(counter_ptr + row, 0)

    return sample_kernel, bucket_kernel, bin_kernel


def _p2(n: int) -> int:
    return max(2, 1 << (n - 1).bit_length())


class FusedSampler:
    """Launches the sampling kernels, with their per-row partial results and arrival counters kept between steps."""

    def __init__(
        self, device: torch.device, block: int = BLOCK, filter_block: int = FILTER_BLOCK, bin_block: int | None = None
    ):
        self.device = device
        # Smaller in the CPU tests, where Triton's interpreter pays per vocabulary lane.
        self.block = block
        self.filter_block = filter_block
        self.bin_block = bin_block or block
        self.scratch: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < numel:
            size = max(numel, 2 * (0 if buf is None else buf.numel()))
            # Counters and bins are zero between launches: each row's last program clears its own.
            buf = self.scratch[name] = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=self.device)
        return buf

    def tokens(self, rows: int) -> torch.Tensor:
        """The token buffer's first `rows` entries: the engine's sampler passes it as every launch's out, so CUDA
        graphs can read the tokens of the step before from one place (engine/layers/embedding.py). A larger request
        than any before replaces it; the graphs then see that the tokens are not in the buffer they read."""
        return self._buffer("tokens", rows, torch.long)[:rows]

    def __call__(
        self,
        logits: torch.Tensor,
        params: torch.Tensor | None = None,
        filtered: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [rows] (int64) for logits [rows, vocab]: greedy where params is None, else per row as params
        [6, rows] int64 says (sample_params); filtered applies its top-k / top-p / min-p (16-bit float logits).
        Written into out (int64 [rows]) when given, else into a new tensor."""
        rows, vocab = logits.shape
        if out is None:
            out = torch.empty(rows, dtype=torch.long, device=logits.device)
        if rows == 0:
            return out
        sample, bucket, binned = _build_kernels()
        counters = self._buffer("counters", rows, torch.int32, zero=True)
        rowf = self._buffer("rowf", 4 * rows, torch.float32)
        rowi = self._buffer("rowi", 4 * rows, torch.int32)
        filtered = filtered and params is not None
        if filtered:
            if logits.dtype not in FILTER_DTYPES:
                raise ValueError(f"filtered sampling needs bfloat16 or float16 logits, got {logits.dtype}")
            chunks = -(-vocab // self.filter_block)
            n = rows * chunks
            common = (logits, logits.stride(0), params)
            bucket[(rows, chunks)](
                *common,
                self._buffer("tops", n, torch.float32),
                self._buffer("masses", n * BUCKETS, torch.float32),
                self._buffer("counts", n * BUCKETS, torch.int32),
                counters, rowf, rowi, rows, vocab, chunks,
                BLOCK=self.filter_block, SHIFT=SHIFT, BUCKETS=BUCKETS,
                CHUNKS_P2=_p2(chunks), num_warps=WARPS,
            )  # fmt: skip
            chunks = -(-vocab // self.bin_block)
            binned[(rows, chunks)](
                *common, self._buffer("bins", rows * BINS, torch.int32, zero=True), counters, rowf, rowi,
                rows, vocab, chunks, BLOCK=self.bin_block, SHIFT=SHIFT, num_warps=WARPS,
            )  # fmt: skip
        chunks = -(-vocab // self.block)
        sample[(rows, chunks)](
            logits,
            logits.stride(0),
            params if params is not None else out,
            self._buffer("best", rows * chunks, torch.float32),
            self._buffer("where", rows * chunks, torch.int32),
            counters,
            out,
            rowf,
            rowi,
            rows,
            vocab,
            chunks,
            BLOCK=self.block,
            CHUNKS_P2=_p2(chunks),
            SAMPLE=params is not None,
            FILTER=filtered,
            NOT_FOUND=NOT_FOUND,
            num_warps=WARPS,
        )
        return out


def sample_params(
    seeds: list[int],
    token_index: list[int],
    temperatures: list[float],
    top_k: list[int] | None = None,
    top_p: list[float] | None = None,
    min_p: list[float] | None = None,
) -> torch.Tensor:
    """The kernels' params on the host: int64 [6, rows] of seeds (63 bits), token indices, the temperatures' float32
    bit patterns, top-k (NO_TOP_K when off), and top-p's and min-p's float32 bit patterns (1 and 0 when off)."""
    n = len(seeds)

    def bits(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(torch.int32).to(torch.int64)

    mask = 2**63 - 1
    return torch.stack([
        torch.tensor([s & mask for s in seeds], dtype=torch.int64),
        torch.tensor(token_index, dtype=torch.int64),
        bits(temperatures),
        torch.tensor([NO_TOP_K] * n if top_k is None else [k if k > 0 else NO_TOP_K for k in top_k], dtype=torch.int64),
        bits([1.0] * n if top_p is None else top_p),
        bits([0.0] * n if min_p is None else min_p),
    ])  # fmt: skip
