"""Batched token sampling in torch: greedy, temperature, top-k, top-p, min-p, per-request seeds."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from engine.attention.base import to_device
from engine.layers.sample import FILTER_DTYPES, FusedSampler, fused_sample_enabled, sample_params
from engine.request import Request


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float, 0 for greedy rows
    top_k: torch.Tensor  # [B] int, vocab size when off
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    all_greedy: bool
    any_filter: bool
    generators: list[torch.Generator | None]  # per-row seeded generator, None = engine generator
    banned: list[list[int]]  # per-row token ids forbidden this step (EOS before min_tokens)
    logprobs: list[int | None]


class Sampler:
    """Turns logits into token ids; keeps one generator per seeded request so seeds reproduce."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}
        # CUDA: greedy and plain temperature sampling in one Triton kernel (engine/layers/sample.py), whose noise is
        # keyed by a seed per request: the request's own, or one drawn here for it from the engine's seed.
        self.fused = FusedSampler(device) if fused_sample_enabled(device) else None
        self.seed_source = random.Random(seed)
        self.request_seeds: dict[str, int] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator and seed."""
        self.request_generators.pop(request_id, None)
        self.request_seeds.pop(request_id, None)

    def warm(self, vocab: int, dtype: torch.dtype) -> None:
        """Run the fused kernels' greedy, sampling and filtered forms once on logits of the model's width and dtype,
        so that none compiles in a request's step."""
        if self.fused is not None:
            from engine.layers.linear import warm_in_threads

            logits = torch.zeros(1, vocab, dtype=dtype, device=self.device)
            params = to_device([sample_params([0], [0], [1.0], [1], [0.5], [0.1])], self.device)[0]
            calls = [lambda: self.fused(logits), lambda: self.fused(logits, params)]
            if dtype in FILTER_DTYPES:
                calls.append(lambda: self.fused(logits, params, filtered=True))
            warm_in_threads(calls, self.device)
            for call in calls:  # with one compile thread warm_in_threads runs nothing
                call()
            torch.cuda.synchronize(self.device)

    def _seed_for(self, req: Request) -> int:
        if req.params.seed is not None:
            return req.params.seed
        seed = self.request_seeds.get(req.request_id)
        if seed is None:
            seed = self.request_seeds[req.request_id] = self.seed_source.getrandbits(63)
        return seed

    def _generator_for(self, req: Request) -> torch.Generator | None:
        if req.params.seed is None:
            return None
        g = self.request_generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.params.seed)
            self.request_generators[req.request_id] = g
        return g

    @staticmethod
    def fusable(reqs: list[Request], dtype: torch.dtype, vocab_size: int) -> bool:
        """Whether the fused kernels can sample these rows: 16-bit float logits for the top-k, top-p and min-p
        filters (their cut-off search keys on the 16-bit float's bits), or no filter."""
        return dtype in FILTER_DTYPES or not any(filtered(r.params, vocab_size) for r in reqs)

    def prepare(self, reqs: list[Request], vocab_size: int, eos_ids: set[int]) -> SamplingBatch:
        """Gather the rows' settings into tensors."""
        ps = [r.params for r in reqs]
        temps = [p.temperature for p in ps]
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in ps]
        banned = [banned_ids(r, eos_ids) for r in reqs]
        any_filter = any(filtered(p, vocab_size) for p in ps)
        # Through one pinned buffer per dtype: torch.tensor(..., device=cuda) copies from pageable memory, which may
        # wait for the steps already queued, and then the host cannot launch the next step while this one runs
        # (temperature sampling ran at 0.42x greedy's tok/s at batch 1, docs/benchmarks.md).
        floats = [torch.tensor(x, dtype=torch.float32) for x in (temps, [p.top_p for p in ps], [p.min_p for p in ps])]
        temperature, top_p, min_p = to_device(floats, self.device)
        (top_k_t,) = to_device([torch.tensor(top_k, dtype=torch.long)], self.device)
        return SamplingBatch(
            temperature=temperature,
            top_k=top_k_t,
            top_p=top_p,
            min_p=min_p,
            all_greedy=all(t == 0.0 for t in temps),
            any_filter=any_filter,
            generators=[self._generator_for(r) for r in reqs],
            banned=banned,
            logprobs=[p.logprobs for p in ps],
        )

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sample one token per row; also returns the log-softmax when any row asked for logprobs."""
        logits = ban(logits.float(), batch.banned)
        logprob_out = None
        if any(n is not None for n in batch.logprobs):
            logprob_out = torch.log_softmax(logits, dim=-1)
        greedy_ids = logits.argmax(-1)
        if batch.all_greedy:
            return greedy_ids, logprob_out
        temps = batch.temperature.clamp_min(1e-5).unsqueeze(1)
        probs = torch.softmax(logits / temps, dim=-1)
        if batch.any_filter:
            probs = filter_probs(probs, batch.top_k, batch.top_p, batch.min_p)
        noise = self._exponential_noise(probs, batch.generators)
        # Gumbel-max in exponential form: argmax p/E, E ~ Exp(1), samples from p with no host sync.
        sampled = (probs / noise).argmax(-1)
        ids = torch.where(batch.temperature == 0.0, greedy_ids, sampled)
        return ids, logprob_out

    def sample(self, logits: torch.Tensor, reqs: list[Request], vocab_size: int, eos_ids: set[int]):
        """Sample a token per row; greedy batches without constraints skip building any tensor."""
        wanted = [r.params.logprobs for r in reqs]
        out = self.fused.tokens(logits.shape[0]) if self.fused is not None else None
        if all(r.params.temperature == 0.0 and r.num_output_tokens >= r.params.min_tokens for r in reqs):
            tokens = logits.argmax(-1) if out is None else self.fused(logits, out=out)
        elif out is not None and self.fusable(reqs, logits.dtype, vocab_size):
            banned = [banned_ids(r, eos_ids) for r in reqs]
            if any(banned):
                logits = ban(logits.clone(), banned)  # the graphs' logits buffer is shared: mask a copy
            ps = [r.params for r in reqs]
            host = sample_params(
                [self._seed_for(r) for r in reqs],
                [r.num_output_tokens for r in reqs],
                [p.temperature for p in ps],
                [p.top_k for p in ps],
                [p.top_p for p in ps],
                [p.min_p for p in ps],
            )
            params = to_device([host], self.device)[0]
            some_filtered = any(filtered(p, vocab_size) for p in ps)
            tokens = self.fused(logits, params, filtered=some_filtered, out=out)
        else:
            batch = self.prepare(reqs, vocab_size, eos_ids)
            ids, logprobs = self(logits, batch)
            if out is not None:
                # Into the buffer the CUDA graphs read the next step's input tokens from, as the kernels' tokens go:
                # the next step then needs no patch of its inputs outside the graph (engine/layers/embedding.py).
                ids = out.copy_(ids)
            return ids, logprobs, batch.logprobs
        if all(n is None for n in wanted):
            return tokens, None, None
        # Logprobs of the model's distribution (banned tokens at -inf), as the torch path gives them. The tokens still
        # come from the kernels (out: the buffer the CUDA graphs read the next step's inputs from): a seeded request
        # draws the same ones with or without logprobs, and a filter needs no sort over the vocabulary.
        return tokens, log_probs(logits), wanted

    def _exponential_noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, g in enumerate(generators):
            if g is not None:
                noise[row].exponential_(generator=g)
        return noise


def banned_ids(req: Request, eos_ids: set[int]) -> list[int]:
    """Token ids this request may not sample now: its stop tokens (and EOS) until it has min_tokens."""
    if req.num_output_tokens >= req.params.min_tokens:
        return []
    return sorted(set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else eos_ids))


def ban(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """logits with each row's banned ids set to -inf (in place), the ids sent through a pinned buffer."""
    rows = [row for row, ids in enumerate(banned) for _ in ids]
    if rows:
        index = to_device([torch.tensor(rows), torch.tensor([i for ids in banned for i in ids])], logits.device)
        logits[index[0], index[1]] = float("-inf")
    return logits


def filtered(params, vocab_size: int) -> bool:
    """Whether a request's sampling has a top-k, top-p or min-p filter that can drop a token (top-k 0, -1 or at
    least the vocabulary is off)."""
    return 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0


def filter_probs(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero out tokens outside each row's top-k, top-p nucleus and min-p floor, then renormalise. A token survives
    when fewer than top_k tokens and less than top_p of the mass lie strictly above it and it has at least min_p
    times the top probability; a tie at the cut-off survives whole (as HF's top-k, and the GPU kernels)."""
    sorted_probs = probs.sort(dim=-1, descending=True).values
    ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    keep = ranks < top_k.unsqueeze(1)
    # Keep a token while the mass before it is under top_p: the most likely token always stays.
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep &= mass_before < top_p.unsqueeze(1)
    keep &= sorted_probs >= (min_p.unsqueeze(1) * sorted_probs[:, :1])
    # keep is a prefix of the sorted row, and its last value is the cut-off. The first of a tie has only larger
    # values before it, so whether it survives does not depend on the sort's order among equal values; keeping
    # every value at or above the cut-off then keeps the tie whole.
    cut = sorted_probs.gather(-1, keep.sum(-1, keepdim=True).clamp_min(1) - 1)
    kept = torch.where(probs >= cut, probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """The log-softmax of each row of logits, in float32."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, wanted: list[int | None]):
    """On the device, without a host sync: the sampled tokens' logprobs and each row's top-k (k = most wanted)."""
    k = max((n or 0) for n in wanted)
    if k <= 1:
        # On CUDA torch.topk over a vocabulary-wide row took ~150 µs of host time a call, the largest part of a
        # batch-1 step with logprobs (H200 profile, docs/benchmarks.md section 11); max is one reduction.
        top_vals, top_ids = logprobs.max(dim=-1, keepdim=True)
    else:
        top_vals, top_ids = logprobs.topk(k, dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    return chosen, top_vals, top_ids


def top_logprobs(
    chosen: list[float], top_vals: list[list[float]], top_ids: list[list[int]], token_ids: list[int], wanted
) -> list[dict[int, float] | None]:
    """Per row: the sampled token's logprob plus the row's requested number of most likely tokens."""
    out: list[dict[int, float] | None] = []
    for row, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        d = {top_ids[row][j]: top_vals[row][j] for j in range(n)}
        d[token_ids[row]] = chosen[row]
        out.append(d)
    return out
