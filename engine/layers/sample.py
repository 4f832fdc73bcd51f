"""Token sampling on the GPU in one Triton kernel: greedy, or temperature sampling by the Gumbel-max trick.

Why: torch's sampling path is a chain of kernels over the [rows, vocab] logits (a float copy, softmax, exponential
noise, a division, two argmaxes, a select), each reading and writing the whole vocabulary, and even greedy's argmax
over 151,936 logits ran 12.7 us per step at batch 1 (H200, docs/benchmarks.md). Here each program reads one chunk of
a row once, adds Gumbel noise drawn from Philox (tl.rand) to logits / temperature, and keeps the chunk's best; the
last program of a row to arrive (an atomic counter, acquire-release, as in the split-KV attention) picks the row's
token. argmax(logits / T + Gumbel) is a draw from softmax(logits / T), the same race as torch's path
(probs / exponential noise), without the softmax.

The noise of row r at vocabulary index i is Philox(seed of r's request, counter (token index << 32) + i): a
request's draws depend on its seed and how many tokens it has, not on the batch it shares or on the step timing.
Top-k / top-p / min-p filters and logprobs keep the torch path (engine/sampler.py). NANOVLLM_FUSED_SAMPLE=0 turns
this kernel off.
"""

from __future__ import annotations

import functools

import torch

from engine.config import env_choice
from engine.layers.kernels import triton_available

BLOCK = 4096  # vocabulary entries per program: 38 programs per row for Qwen3's 151,936
WARPS = 8
NOT_FOUND = 2**31 - 1  # an index larger than any vocabulary's: loses every tie


def fused_sample_enabled(device: torch.device) -> bool:
    """Whether sampling on this device runs in the Triton kernel (NANOVLLM_FUSED_SAMPLE, "1" by default)."""
    return env_choice("NANOVLLM_FUSED_SAMPLE", "1", ("0", "1")) == "1" and device.type == "cuda" and triton_available()


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

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
        rows,
        V,
        chunks,
        BLOCK: tl.constexpr,
        CHUNKS_P2: tl.constexpr,
        SAMPLE: tl.constexpr,
        NOT_FOUND: tl.constexpr,
    ):
        # Program (row, chunk): the best score of logits[row, chunk * BLOCK:][:BLOCK] and where it is; params holds
        # per row (seed, token index, temperature's float32 bits) as int64 rows of `rows` entries (SAMPLE only).
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + cols, mask=cols < V, other=float("-inf"))
        x = x.to(tl.float32)
        if SAMPLE:
            temp = tl.load(params_ptr + 2 * rows + row).to(tl.int32).to(tl.float32, bitcast=True)
            if temp > 0.0:  # temperature 0: greedy, no noise
                seed = tl.load(params_ptr + row)
                counter = (tl.load(params_ptr + rows + row) << 32) + cols.to(tl.int64)
                u = tl.rand(seed, counter)  # [0, 1): u = 0 scores -inf, never chosen
                x = x / tl.maximum(temp, 1e-5) - tl.log(-tl.log(u))
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

    return sample_kernel


class FusedSampler:
    """Launches the sampling kernel, with its per-row partial results and arrival counters kept between steps."""

    def __init__(self, device: torch.device, block: int = BLOCK):
        self.device = device
        self.block = block  # smaller in the CPU tests, where Triton's interpreter pays per vocabulary lane
        self.best = self.where = self.counters = None

    def _buffers(self, rows: int, chunks: int) -> None:
        if self.counters is None or self.counters.numel() < rows or self.best.numel() < rows * chunks:
            size = max(rows, 2 * (0 if self.counters is None else self.counters.numel()))
            self.best = torch.empty(size * chunks, dtype=torch.float32, device=self.device)
            self.where = torch.empty(size * chunks, dtype=torch.int32, device=self.device)
            # Zero between launches: each row's last program resets its own counter.
            self.counters = torch.zeros(size, dtype=torch.int32, device=self.device)

    def __call__(self, logits: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [rows] (int64) for logits [rows, vocab]: greedy where params is None, else per row as
        params [3, rows] int64 says (seed, token index, float32 bits of the temperature; 0 is greedy)."""
        rows, vocab = logits.shape
        chunks = -(-vocab // self.block)
        self._buffers(rows, chunks)
        out = torch.empty(rows, dtype=torch.long, device=logits.device)
        if rows == 0:
            return out
        _build_kernel()[(rows, chunks)](
            logits,
            logits.stride(0),
            params if params is not None else out,
            self.best,
            self.where,
            self.counters,
            out,
            rows,
            vocab,
            chunks,
            BLOCK=self.block,
            CHUNKS_P2=max(2, 1 << (chunks - 1).bit_length()),
            SAMPLE=params is not None,
            NOT_FOUND=NOT_FOUND,
            num_warps=WARPS,
        )
        return out


def sample_params(seeds: list[int], token_index: list[int], temperatures: list[float]) -> torch.Tensor:
    """The kernel's params on the host: int64 [3, rows] of seeds (63 bits), token indices and the temperatures'
    float32 bit patterns."""
    temps = torch.tensor(temperatures, dtype=torch.float32).view(torch.int32).to(torch.int64)
    mask = 2**63 - 1
    return torch.stack([torch.tensor([s & mask for s in seeds], dtype=torch.int64),
                        torch.tensor(token_index, dtype=torch.int64), temps])  # fmt: skip
