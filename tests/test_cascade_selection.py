"""Which decode steps use cascade attention: the shared-prefix rule, and its per-step cache staying correct."""

from __future__ import annotations

from types import SimpleNamespace

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, SchedulerOutput


def engine_for(cfg: EngineConfig) -> LLMEngine:
    runner = SimpleNamespace(vocab_size=100, hf_config=SimpleNamespace(eos_token_id=2), supports_cascade=True)
    return LLMEngine(cfg, runner, None, num_blocks=4096, max_model_len=8192, model_name="fake")


def make_engine(**overrides) -> LLMEngine:
    settings = dict(
        enable_cascade_attention=True,
        cascade_min_requests=2,
        cascade_min_prefix_tokens=32,
        cascade_min_shared_tokens=1,
        block_size=16,
    )
    return engine_for(EngineConfig(**{**settings, **overrides}))


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


def test_a_prefix_needs_both_its_length_and_enough_requests():
    # With 32 tokens at least and requests x tokens at least 128: 32 tokens pay from 4 requests, 48 from 3, and
    # 16 tokens never, however many requests share them.
    engine = make_engine(cascade_min_shared_tokens=128)
    out, _ = decode_step([[1, 2, 10], [1, 2, 11], [1, 2, 12]])
    assert engine.shared_prefix_blocks(out) == 0  # 3 x 32 = 96
    out, _ = decode_step([[1, 2, 10], [1, 2, 11], [1, 2, 12], [1, 2, 13]])
    assert engine.shared_prefix_blocks(out) == 2  # 4 x 32 = 128
    out, _ = decode_step([[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 3, 12]])
    assert engine.shared_prefix_blocks(out) == 3  # 3 x 48 = 144
    out, _ = decode_step([[1, 10 + i] for i in range(16)])
    assert engine.shared_prefix_blocks(out) == 0  # 16 x 16 = 256, but 16 tokens < 32
    # Nothing shared is never a cascade, whatever the thresholds.
    out, _ = decode_step([[5, 10], [6, 11], [7, 12], [8, 13]])
    assert make_engine(cascade_min_prefix_tokens=1).shared_prefix_blocks(out) == 0


def test_defaults_follow_the_measured_crossover():
    # docs/benchmarks.md, section 5 (H100): cascade paid at 4k tokens from 4 requests, 2k from 8, 1k from 16, and
    # lost at 2k with 4 requests, 1k with 8, and at 512 tokens with any count. 64-token blocks.
    engine = engine_for(EngineConfig(block_size=64))
    for requests, prefix_blocks, expected in [
        (4, 64, 64),
        (8, 32, 32),
        (16, 16, 16),
        (4, 32, 0),
        (8, 16, 0),
        (64, 8, 0),
    ]:
        out, _ = decode_step([list(range(prefix_blocks)) + [1000 + i] for i in range(requests)])
        assert engine.shared_prefix_blocks(out) == expected, (requests, prefix_blocks)
