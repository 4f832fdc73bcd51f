"""Property tests of the block manager and scheduler: no leaks, no double frees, no false prefix hits."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

import engine.block_manager as block_manager
from engine.block_manager import BlockManager, hash_block, token_bytes
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler


def run_fake_step(sched: Scheduler, rng: random.Random, finished: list[Request], vocab: int = 5) -> None:
    """Schedule, pretend the model ran, append a token to sampling requests, retire finished ones."""
    out = sched.schedule()
    sched.commit(out)
    for s in out.scheduled:
        if s.samples:
            s.req.append_token(rng.randrange(vocab), 0.0)
            if s.req.num_output_tokens >= s.req.params.max_tokens:
                sched.remove(s.req)
                finished.append(s.req)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 70), st.integers(1, 12)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
    ),
    max_size=60,
)


def hashed_lookup(bm: BlockManager, req: Request) -> list[int]:
    """The prefix lookup written plainly: hash every leading full block, stop at the first miss."""
    bs, tokens = bm.block_size, req.all_token_ids
    hits, parent = [], b""
    for i in range((len(tokens) - 1) // bs):
        chunk = token_bytes(tokens[i * bs : (i + 1) * bs])
        h = hash_block(parent, chunk)
        block_id = bm.hash_to_block.get(h)
        if block_id is None or bm.blocks[block_id].token_ids != chunk:
            break
        hits.append(block_id)
        parent = h
    return hits


class CheckedBlockManager(BlockManager):
    """Every lookup (which may reuse the recent prefix's hashes) must equal the plain one."""

    def find_cached_prefix(self, req: Request) -> list[int]:
        """The engine's lookup, checked."""
        expected = hashed_lookup(self, req) if self.enable_prefix_caching else []
        hits = super().find_cached_prefix(req)
        assert hits == expected, (req.all_token_ids, hits, expected)
        return hits


@given(
    ops=ops, num_blocks=st.integers(6, 30), budget=st.integers(1, 64), seed=st.integers(0, 2**16), caching=st.booleans()
)
@settings(max_examples=150, deadline=None)
def test_random_add_step_abort_never_leaks_blocks(ops, num_blocks, budget, seed, caching):
    rng = random.Random(seed)
    # Lookups are also checked against the plain hashed lookup (CheckedBlockManager).
    bm = CheckedBlockManager(num_blocks, block_size=4, enable_prefix_caching=caching)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget)
    live: list[Request] = []
    finished: list[Request] = []
    for op, a, b in ops:
        if op == "add":
            # Small vocab so prompts repeat and the prefix cache gets hits; every request fits the cache alone.
            n = min(a, num_blocks * 4 - b)
            if n < 1:
                continue
            req = Request([rng.randrange(3) for _ in range(n)], SamplingParams(max_tokens=b))
            sched.add(req)
            live.append(req)
        elif op == "step":
            run_fake_step(sched, rng, finished)
        elif live:
            req = live[a % len(live)]
            if req not in finished:
                sched.remove(req)
                finished.append(req)
        bm.check_invariants()
        held = sum(len(r.block_table) for r in sched.running)
        # Every used block is held by a running request (shared blocks count once per holder).
        assert bm.num_used_blocks <= held
    for _ in range(2000):
        if not sched.has_work():
            break
        run_fake_step(sched, rng, finished)
        bm.check_invariants()
    assert not sched.has_work(), "scheduler deadlocked"
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == num_blocks


def test_prefix_hit_requires_identical_tokens():
    bm = BlockManager(8, block_size=4)
    a = Request([1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    same = Request([1, 2, 3, 4, 5, 6, 7, 8, 0], SamplingParams())
    assert bm.find_cached_prefix(same) == a.block_table[:2]
    other = Request([1, 2, 3, 4, 5, 6, 7, 0, 0], SamplingParams())
    assert bm.find_cached_prefix(other) == a.block_table[:1]
    # A different first block breaks the chain even where later tokens agree.
    shifted = Request([0, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    assert bm.find_cached_prefix(shifted) == []


def test_block_content_is_every_token_id_in_full():
    # Ids of large vocabularies (Qwen3: 151,936) must not alias: a narrower encoding would let 65,537 match 1.
    ids = [1, 65_537, 151_935, 2**40 + 3]
    assert token_bytes(ids) == b"".join(i.to_bytes(8, "little") for i in ids)
    bm = BlockManager(8, block_size=4)
    a = Request([1, 2, 3, 65_537, 5], SamplingParams())
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert bm.find_cached_prefix(Request([1, 2, 3, 65_537, 9], SamplingParams())) == a.block_table[:1]
    assert bm.find_cached_prefix(Request([1, 2, 3, 1, 5], SamplingParams())) == []


def test_freed_cached_blocks_are_reused_least_recently_used_first():
    bm = BlockManager(4, block_size=2)
    a = Request([1, 2, 3], SamplingParams())
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.cache_full_blocks(a)
    bm.free(a)
    assert bm.num_cached_free_blocks == 1 and bm.num_used_blocks == 0
    b = Request([9, 9, 9, 9, 9], SamplingParams())
    # Needs 3 blocks: the two never-used blocks go first, then the oldest freed one.
    bm.allocate(b, 5)
    assert bm.num_free_blocks == 1
    c = Request([1, 2, 7], SamplingParams())
    assert bm.find_cached_prefix(c) != [] or bm.num_cached_free_blocks == 0


def test_a_shared_prefix_is_hashed_once_per_burst(monkeypatch):
    # Many requests over one cached document: the lookups reuse the cached prefix's hash chain (a byte compare)
    # instead of hashing every block again; only blocks past the known prefix are hashed.
    calls = []
    monkeypatch.setattr(block_manager, "hash_block", lambda parent, data: calls.append(1) or hash_block(parent, data))
    bm = BlockManager(64, block_size=4)
    doc = list(range(100, 132))  # 8 blocks
    a = Request(doc + [1], SamplingParams())
    assert bm.allocate(a, len(doc) + 1)
    a.num_computed_tokens = len(doc) + 1
    bm.cache_full_blocks(a)
    assert len(calls) == 8
    calls.clear()
    for q in range(5):
        req = Request(doc + [q, q, q, q, q], SamplingParams())
        assert bm.find_cached_prefix(req) == a.block_table[:8]
    assert len(calls) == 5  # per lookup, only its first block past the document (a miss)
    # A request that shares only part of the document reuses the hashes of the blocks it shares, and hashes
    # from its first differing block on.
    calls.clear()
    partial = Request(doc[:12] + [7] * 20, SamplingParams())
    assert bm.find_cached_prefix(partial) == a.block_table[:3]
    assert len(calls) == 1
    # An evicted middle block ends the chain there, with or without the reused hashes.
    table = list(a.block_table)
    bm.free(a)
    victim = table[4]
    bm.free_queue.move_to_end(victim, last=False)
    filler = Request([9] * 3, SamplingParams())
    assert bm.allocate(filler, 3)
    assert bm.blocks[victim].hash is None
    again = Request(doc + [5], SamplingParams())
    assert bm.find_cached_prefix(again) == table[:4] == hashed_lookup(bm, again)
