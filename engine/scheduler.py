"""Continuous batching: which requests run in the next step, how many tokens each, and who is preempted."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """One request's share of a step: num_new_tokens tokens starting at position start."""

    req: Request
    start: int
    num_new_tokens: int
    # True when this chunk reaches the end of the request's tokens, so the step samples a new one. Fixed when
    # scheduled: the request grows a placeholder once the step is launched.
    samples: bool = field(init=False)

    def __post_init__(self):
        self.samples = self.start + self.num_new_tokens == self.req.num_tokens


@dataclass
class SchedulerOutput:
    """The plan of one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this step."""
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        """True when every scheduled request computes exactly one token."""
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    """Keeps the waiting queue and running list and plans each step under a token and block budget."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        """Queue a new request."""
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        """True while any request is waiting or running."""
        return bool(self.waiting or self.running)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and return its blocks (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.bm.free(req)

    def _preempt(self, req: Request) -> None:
        # Recompute later: drop the KV, keep the tokens (prompt and outputs so far).
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step: running requests first (oldest first), then new ones while budget remains."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.length_capped:
                i += 1  # its last token is being sampled; it ends when that step is collected
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.allocate(req, n):
                # Out of blocks: preempt the newest running request, possibly this one.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
                budget -= n
                i += 1
        if out.preempted:
            return out
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            cached = self.bm.find_cached_prefix(req)
            n = min(req.num_tokens - len(cached) * self.bm.block_size, budget)
            if not self.bm.allocate(req, n, cached):
                break
            if req.num_preemptions == 0:
                req.num_cached_tokens = len(cached) * self.bm.block_size
                self.bm.record_prefix_query(req.num_prompt_tokens, req.num_cached_tokens)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.scheduled_time is None:
                req.scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
            budget -= n
        return out

    def commit(self, out: SchedulerOutput) -> None:
        """Advance the computed-token counts after the step ran, and publish completed blocks to the prefix cache."""
        block_size = self.bm.block_size
        for s in out.scheduled:
            if s.req.is_finished:
                continue  # ended (stop string, abort) while the step ran; its blocks are already freed
            s.req.num_computed_tokens = done = s.start + s.num_new_tokens
            if done // block_size > s.req.num_hashed_blocks:  # only when a block filled up
                self.bm.cache_full_blocks(s.req)
