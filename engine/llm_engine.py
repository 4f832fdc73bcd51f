"""The engine core: a synchronous step() over scheduler, runner and detokenizer, driven by a background thread."""

from __future__ import annotations

import gc
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import BlockManager
from engine.channel import OutputChannel
from engine.config import EngineConfig
from engine.request import Request, RequestStatus, StreamDelta, make_output, token_bytes
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import IncrementalDetokenizer, add_tokens

logger = logging.getLogger("engine")


class EngineShutdownError(RuntimeError):
    """The engine was shut down; it takes no more requests."""


class StepObserver:
    """Receives per-step and per-request events (the metrics layer implements this); must be cheap."""

    def on_step(self, engine: LLMEngine, out: SchedulerOutput, num_generated: int, cascade: bool) -> None:
        """Called after each step."""

    def on_finish(self, engine: LLMEngine, req: Request) -> None:
        """Called once per request when it finishes, whatever the reason."""


@dataclass
class _InFlight:
    """A launched step: its plan, the runner's handle, and whether it used cascade attention."""

    out: SchedulerOutput
    handle: tuple | None
    cascade: bool


class LLMEngine:
    """Owns the scheduler, block manager and model runner; serves requests from any thread or event loop."""

    def __init__(self, config: EngineConfig, runner, tokenizer, num_blocks: int, max_model_len: int, model_name: str):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = runner.vocab_size
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_ids = self._eos_ids()
        runner.eos_ids = self.eos_ids
        self.requests: dict[str, Request] = {}
        self.observers: list[StepObserver] = []
        self._pending: list[Request] = []
        self._aborts: list[str] = []
        # Tokens recorded but not yet detokenized/delivered: (request, token id, finish reason or None).
        self._deliveries: list[tuple[Request, int, str | None]] = []
        self._inflight: _InFlight | None = None  # the launched step not yet collected
        self._shared_cache: tuple[tuple, int] = ((), 0)  # (which requests, their common prefix in blocks)
        self._cv = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.fault_injector: Callable[[SchedulerOutput], None] | None = None  # tests raise from here
        self.num_steps = 0
        # NANOVLLM_STEP_TIMING=1 accumulates host time per phase of step() (schedule/execute/finish), for profiling.
        self.step_timing: dict[str, float] | None = {} if os.environ.get("NANOVLLM_STEP_TIMING") else None
        runner.step_timing = self.step_timing
        if self.step_timing is not None:
            gc.callbacks.append(self._time_gc)
        self._gc_start = 0.0

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen_cfg = getattr(self.runner.hf_config, "eos_token_id", None)
        for v in gen_cfg if isinstance(gen_cfg, list) else [gen_cfg]:
            if v is not None:
                ids.add(int(v))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ---- submission (any thread) ----

    def validate_prompt(self, token_ids: list[int]) -> bytes:
        """Raise ValueError (TypeError for an id that is not an integer) naming the problem when a prompt cannot be
        served; return the ids as token_bytes(), which the prefix cache hashes."""
        if len(token_ids) == 0:
            raise ValueError("prompt is empty; pass at least one token or a non-empty string")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                f"shorten the prompt to at most {self.max_model_len - 1} tokens or raise max_model_len"
            )
        # One C-speed pass packs and type-checks the ids, numpy checks the range on the bytes (33 us for 4k tokens
        # on the CI machine, against 195 us for a type scan plus min() and max() over the list); details only on
        # failure.
        try:
            data = token_bytes(token_ids)
        except struct.error:
            data = None
        ids = None if data is None else np.frombuffer(data, dtype="<i8")
        if ids is None or ids.min() < 0 or ids.max() >= self.vocab_size:
            odd = [t for t in token_ids if not hasattr(type(t), "__index__")]
            if odd:
                raise TypeError(f"token ids must be integers; got {odd[0]!r} of type {type(odd[0]).__name__}")
            bad = [t for t in token_ids if not (0 <= t < self.vocab_size)]
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return data

    def add_request(
        self, token_ids: list[int], params: SamplingParams, request_id: str | None = None, stream: bool = True
    ) -> Request:
        """Validate and queue a request; its deltas arrive on req.channel (stream=False: only the final one)."""
        return self.add_requests([(token_ids, params, request_id)], stream=stream)[0]

    def add_requests(
        self, items: list[tuple[list[int], SamplingParams, str | None]], stream: bool = True
    ) -> list[Request]:
        """Validate and queue several requests at once, so the first step sees all of them (none is queued if any
        is invalid). With stream=False only each request's final delta (with its output) reaches its channel."""
        if self._stopped:
            raise EngineShutdownError("the engine has been shut down; create a new LLM")
        reqs = []
        for token_ids, params, request_id in items:
            data = self.validate_prompt(token_ids)
            req = Request(token_ids, params, request_id, prompt_bytes=data)
            req.detok = IncrementalDetokenizer(self.tokenizer, params.stop) if self.tokenizer is not None else None
            req.channel = OutputChannel()
            req.stream_deltas = stream
            reqs.append(req)
        ids = [r.request_id for r in reqs]
        with self._cv:
            taken = [i for i in ids if i in self.requests]
            if taken or len(set(ids)) != len(ids):
                dup = taken[0] if taken else next(i for i in ids if ids.count(i) > 1)
                raise ValueError(f"request id {dup!r} is already in use")
            for req in reqs:
                self.requests[req.request_id] = req
            self._pending.extend(reqs)
            self._cv.notify()
        self._ensure_thread()
        return reqs

    def abort(self, request_id: str) -> None:
        """Abort a request at any time; its blocks are freed by the loop before the next step."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify()

    # ---- the loop (engine thread) ----

    def _ensure_thread(self) -> None:
        # Under the lock: callers on many threads submit at once, and exactly one loop may ever run step().
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nanovllm-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stopped or self._pending or self._aborts or self.scheduler.has_work())
                if self._stopped:
                    break
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
            for req in pending:
                self.scheduler.add(req)
            if aborts:
                self._flush_deliveries()  # an abort's final delta must come after the tokens already produced
            for request_id in aborts:
                req = self.requests.get(request_id)
                if req is not None and not req.is_finished:
                    self._finish(req, "abort")
            if self.scheduler.has_work():
                self.step()
            if not self.scheduler.has_work():
                self._flush_deliveries()
        if self._inflight is not None:
            self._complete(self._inflight)
        self._flush_deliveries()

    def step(self) -> None:
        """Schedule and launch a step while the previous one still runs on the device, then collect that previous
        step and deliver its tokens while this one runs; a failure fails only the failing step's requests.

        The step in flight has appended a placeholder per sampling request, so this schedule already counts those
        tokens; their values reach the model on the device (ModelRunner.patch_inputs).
        """
        t0 = time.perf_counter()
        prev = self._inflight
        out = self.scheduler.schedule()
        if not out.scheduled:
            if prev is not None:
                self._complete(prev)  # its requests end or continue once their last tokens are known
                self._flush_deliveries()
                return
            self._flush_deliveries()
            if out.preempted:
                return
            # Nothing fits even with an empty batch: cannot happen for validated requests, so fail loudly.
            for req in list(self.scheduler.waiting):
                self._fail(
                    req,
                    RuntimeError(
                        f"request {req.request_id} cannot be scheduled with {self.block_manager.num_blocks} KV blocks"
                    ),
                )
            return
        try:
            if self.fault_injector is not None:
                self.fault_injector(out)
            cascade_blocks = self.shared_prefix_blocks(out)
            # The in-flight step's (sampled-token tensor, {serial: row}), for inputs still on the device.
            feed = None if prev is None or prev.handle is None else prev.handle[:2]
            handle = self.runner.launch(out, cascade_blocks, feed)
        except Exception as exc:  # noqa: BLE001 - any failure belongs to this step's requests
            if prev is not None:
                self._complete(prev)
            self._fail_step(out, exc)
            return
        for s in out.scheduled:
            if s.samples:
                req = s.req
                req.append_placeholder()
                if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                    req.length_capped = True
        self._inflight = _InFlight(out, handle, cascade_blocks > 0)
        t1 = time.perf_counter()
        if prev is not None:
            self._complete(prev)
        # Computed-token counts advance now, so the next schedule can run before this step is collected; the
        # previous step's values were just filled in, so the blocks this step completes hash real tokens.
        self.scheduler.commit(out)
        t2 = time.perf_counter()
        # Overlap: detokenize and deliver tokens while the device computes this step.
        self._flush_deliveries()
        if self.step_timing is not None:
            st = self.step_timing
            for key, dt in (
                ("schedule+launch", t1 - t0),
                ("wait+record", t2 - t1),
                ("deliver", time.perf_counter() - t2),
            ):
                st[key] = st.get(key, 0.0) + dt
            st["steps"] = st.get("steps", 0) + 1

    def _complete(self, flight: _InFlight) -> None:
        # Wait for a launched step and record its tokens (placeholders get their values).
        if self._inflight is flight:
            self._inflight = None
        try:
            token_ids, logprobs = self.runner.collect(flight.handle)
        except Exception as exc:  # noqa: BLE001
            self._fail_step(flight.out, exc)
            return
        self.num_steps += 1
        now = time.monotonic()
        sampled = [s.req for s in flight.out.scheduled if s.samples]
        for i, req in enumerate(sampled):
            if req.is_finished:
                continue  # ended (stop string, stop token, abort) after this step was launched: drop its token
            try:
                self._record(req, token_ids[i], logprobs[i] if logprobs else None, now)
            except Exception as exc:  # noqa: BLE001
                self._fail(req, exc)
        for obs in self.observers:
            obs.on_step(self, flight.out, len(sampled), flight.cascade)

    def _fail_step(self, out: SchedulerOutput, exc: BaseException) -> None:
        logger.error("engine step failed; failing its %d requests", len(out.scheduled), exc_info=exc)
        self._flush_deliveries()
        for s in out.scheduled:
            if not s.req.is_finished:
                self._fail(s.req, exc)

    def shared_prefix_blocks(self, out: SchedulerOutput) -> int:
        """Leading blocks every request of a decode step shares physically, when cascade attention pays."""
        cfg = self.config
        if not cfg.enable_cascade_attention or not getattr(self.runner, "supports_cascade", False):
            return 0
        if not out.is_decode_only or len(out.scheduled) < cfg.cascade_min_requests:
            return 0
        tables = [s.req.block_table for s in out.scheduled]
        # A running request's table only grows at the tail with fresh blocks, so the common prefix of the same
        # requests stays the same from step to step until one is preempted (which rebuilds its table).
        key = tuple((s.req.serial, s.req.num_preemptions) for s in out.scheduled)
        if self._shared_cache[0] != key:
            first = tables[0]
            common = min(len(t) for t in tables)
            for t in tables[1:]:
                n = 0
                while n < common and t[n] == first[n]:
                    n += 1
                common = n
                if not common:
                    break
            self._shared_cache = (key, common)
        # Keep at least one own block per request (the one this step writes into).
        shared = min(self._shared_cache[1], min(len(t) for t in tables) - 1)
        tokens = shared * cfg.block_size
        # Measured on an H100 (docs/benchmarks.md, section 5): the longer the prefix, the fewer requests it takes to
        # pay, but below ~1k tokens it lost at every request count.
        enough = tokens >= cfg.cascade_min_prefix_tokens and tokens * len(tables) >= cfg.cascade_min_shared_tokens
        return shared if shared and enough else 0

    def _record(self, req: Request, token_id: int, logprobs, now: float) -> None:
        # The cheap half of a new token, before the next step is scheduled: append it, and end the request
        # now if a stop token or a length limit says so (no detokenization needed). Delivery comes later.
        req.fill_placeholder(token_id, now)
        if logprobs is not None:
            req.logprobs.append(logprobs)
        p = req.params
        reason = None
        num_out = req.num_output_tokens - req.num_pending  # tokens known so far, this one included
        if num_out >= p.min_tokens and (
            token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_ids)
        ):
            reason = "stop"
        elif num_out >= p.max_tokens or req.num_prompt_tokens + num_out >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._release(req)
        self._deliveries.append((req, token_id, reason))

    def _flush_deliveries(self) -> None:
        """The costly half: detokenize recorded tokens, check stop strings, and put deltas on the channels."""
        deliveries, self._deliveries = self._deliveries, []
        # Detokenize the whole batch in one call; a failure there falls back to one request at a time below.
        todo = [
            i
            for i, (req, token_id, reason) in enumerate(deliveries)
            if req.finish_reason is None and reason != "stop" and req.detok is not None and token_id not in self.eos_ids
        ]
        stops: dict[int, bool] = {}
        try:
            hits = add_tokens([deliveries[i][0].detok for i in todo], [deliveries[i][1] for i in todo])
            stops = dict(zip(todo, hits))
        except Exception:  # noqa: BLE001 - retried per request, so only the failing one fails
            logger.debug("batched detokenization failed; retrying per request", exc_info=True)
        needs_text = set(todo)
        interval = self._stream_interval(deliveries)
        for i, (req, token_id, reason) in enumerate(deliveries):
            try:
                if req.finish_reason is not None:
                    continue  # aborted or failed since the token was recorded
                if i in needs_text:
                    if stops[i] if i in stops else req.detok.add(token_id):
                        reason = "stop"
                        if not req.is_finished:
                            self._release(req)
                if reason is None:
                    # A caller waiting only for the output is not woken per token: at 256 requests the waiting
                    # thread's wake-ups contended for the GIL and drained ~140k deltas after the last step.
                    if req.stream_deltas:
                        req.unsent_ids.append(token_id)
                        if len(req.unsent_ids) >= interval or not req.streamed:
                            text = req.detok.take_delta(False) if req.detok is not None else ""
                            req.channel.put(StreamDelta(req.request_id, text, req.unsent_ids))
                            req.unsent_ids, req.streamed = [], True
                else:
                    self._announce(req, reason)
                    self._put_final(req, reason, token_id)
            except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failure on one request
                self._fail(req, exc)

    def _stream_interval(self, deliveries: list) -> int:
        # Tokens per streamed delta (EngineConfig.stream_interval). Measured on an H200 (docs/benchmarks.md, section
        # 12): one stream keeps its tok/s with a delta per token; 8 streams ran at 0.49x the engine's tok/s with a
        # delta per token and 0.78x with 4, 32 streams at 0.23x and 0.63x with 16.
        if self.config.stream_interval is not None:
            return self.config.stream_interval
        streams = len({req.request_id for req, _, _ in deliveries if req.stream_deltas})
        return min(16, max(1, streams // 2))

    def _release(self, req: Request) -> None:
        # A finished request stops being scheduled and gives back its blocks and generator at once.
        req.status = RequestStatus.FINISHED
        req.finish_time = time.monotonic()
        req.drop_pending()  # a step in flight may still sample for it: that token is dropped
        self.scheduler.remove(req)
        self.runner.sampler.forget(req.request_id)

    def _announce(self, req: Request, reason: str) -> None:
        # Its finish becomes visible: reason, the registry, the observers.
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        for obs in self.observers:
            try:
                obs.on_finish(self, req)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("observer failed")

    def _retire(self, req: Request, reason: str) -> None:
        # Shared end of every request that is not already released: release, then announce.
        if not req.is_finished:
            self._release(req)
        self._announce(req, reason)

    def _put_final(self, req: Request, reason: str, new_token: int | None) -> None:
        text = req.detok.take_delta(True) if req.detok is not None else ""
        output = make_output(req, req.detok.text if req.detok is not None else "")
        ids = req.unsent_ids + ([] if new_token is None else [new_token])
        req.unsent_ids = []
        req.channel.put(StreamDelta(req.request_id, text, ids, finished=True, finish_reason=reason, output=output))

    def _finish(self, req: Request, reason: str, new_token: int | None = None) -> None:
        self._retire(req, reason)
        self._put_final(req, reason, new_token)

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.error = exc
        self._retire(req, "error")
        req.channel.put(exc)

    # ---- state ----

    def stats(self) -> dict:
        """Counts of requests and KV blocks, and how often cascade attention ran."""
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self._pending),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_cached": bm.num_cached_free_blocks,
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_cascade_steps": self.runner.num_cascade_steps,
            "num_steps": self.num_steps,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
        }

    def _time_gc(self, phase: str, info: dict) -> None:
        # Step timing: garbage-collection pauses stall whichever thread triggers them, the engine loop included.
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        st = self.step_timing
        key = f"gc_gen{info['generation']}"
        st[f"{key}_s"] = st.get(f"{key}_s", 0.0) + time.perf_counter() - self._gc_start
        st[f"{key}_n"] = st.get(f"{key}_n", 0) + 1

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop thread and abort everything still pending."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for req in list(self.requests.values()):
            if not req.is_finished:
                self._fail(req, EngineShutdownError("the engine was shut down before this request finished"))
        self.runner.release()
        if self.step_timing is not None and self._time_gc in gc.callbacks:
            gc.callbacks.remove(self._time_gc)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
