"""Which decode steps use cascade attention: the shared-prefix rule, and its per-step cache staying correct."""

from __future__ import annotations

from types import SimpleNamespace

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput


def make_engine(**overrides) -> LLMEngine:
    settings = dict(enable_cascade_attention=True, cascade_min_requests=2, cascade_min_prefix_tokens=32, block_size=16)
    cfg = EngineConfig(**{**settings, **overrides})
    runner = SimpleNamespace(vocab_size=100, hf_config=SimpleNamespace(eos_token_id=2), supports_cascade=True)
    return LLMEngine(cfg, runner, None, num_blocks=64, max_model_len=512, model_name="fake")


def decode_step(tables: list[list[int]], reqs: list[Request] | None = None) -> tuple[SchedulerOutput, list[Request]]:
    reqs = reqs or [Request([1] * (16 * len(t) - 1), SamplingParams()) for t in tables]
    out = SchedulerOutput()
    for req, table in zip(reqs, tables):
        req.block_table = table
        out.scheduled.append(ScheduledRequest(req, req.num_tokens - 1, 1))
    return out, reqs


def test_shared_blocks_are_the_common_physical_prefix_minus_one_own_block():
    engine = make_engine()
    out, _ = decode_step([[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 3, 12, 13]])
    assert engine.shared_prefix_blocks(out) == 3
    # A table that is all prefix keeps its last block as its own.
    out, _ = decode_step([[1, 2, 3], [1, 2, 3, 11]])
    assert engine.shared_prefix_blocks(out) == 2
    # Too short a prefix (32 tokens needed), too few requests, or cascade off: no cascade.
    out, _ = decode_step([[1, 10], [1, 11]])
    assert engine.shared_prefix_blocks(out) == 0
    out, _ = decode_step([[1, 2, 3, 10]])
    assert engine.shared_prefix_blocks(out) == 0
    out, _ = decode_step([[1, 2, 3, 10], [1, 2, 3, 11]])
    assert make_engine(enable_cascade_attention=False).shared_prefix_blocks(out) == 0


def test_cached_prefix_follows_growth_preemption_and_new_requests():
    engine = make_engine()
    out, reqs = decode_step([[1, 2, 3, 10], [1, 2, 3, 11]])
    assert engine.shared_prefix_blocks(out) == 3
    # Same requests, tables grown at the tail: still 3.
    out, reqs = decode_step([[1, 2, 3, 10, 20], [1, 2, 3, 11, 21]], reqs)
    assert engine.shared_prefix_blocks(out) == 3
    # One request was preempted and came back with different blocks: the cache must not answer.
    reqs[1].num_preemptions += 1
    out, reqs = decode_step([[1, 2, 3, 10, 20], [1, 2, 30, 31, 32]], reqs)
    assert engine.shared_prefix_blocks(out) == 2
    # A new request with the same id as a finished one and other blocks: a different request to the cache.
    newcomer = Request([1] * 63, SamplingParams(), request_id=reqs[1].request_id)
    out, _ = decode_step([[1, 2, 3, 10, 20], [1, 40, 41, 42]], [reqs[0], newcomer])
    assert engine.shared_prefix_blocks(out) == 0


def test_shorter_prefixes_cascade_once_enough_requests_share_them():
    # 32 tokens pay from 2 requests; 16 tokens only when requests x tokens reaches 64, i.e. from 4 requests.
    engine = make_engine(cascade_min_shared_tokens=64)
    out, _ = decode_step([[1, 10], [1, 11], [1, 12]])
    assert engine.shared_prefix_blocks(out) == 0  # 3 x 16 = 48
    out, _ = decode_step([[1, 10], [1, 11], [1, 12], [1, 13]])
    assert engine.shared_prefix_blocks(out) == 1  # 4 x 16 = 64
    out, _ = decode_step([[1, 2, 10], [1, 2, 11]])
    assert engine.shared_prefix_blocks(out) == 2  # 32 tokens: the per-prefix threshold alone
    # Nothing shared is never a cascade, whatever the thresholds.
    out, _ = decode_step([[5, 10], [6, 11], [7, 12], [8, 13]])
    assert make_engine(cascade_min_shared_tokens=1).shared_prefix_blocks(out) == 0
