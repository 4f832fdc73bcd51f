"""Runs one scheduled step on the model: builds inputs and attention metadata, runs the forward, samples."""

from __future__ import annotations

import logging
import time

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, to_device
from engine.models.llama import ForwardContext, LlamaForCausalLM, head_dim_of
from engine.sampler import Sampler, logprob_tensors, top_logprobs
from engine.scheduler import SchedulerOutput

logger = logging.getLogger("engine")


class StepBuffers:
    """CUDA events and pinned token buffers reused step after step, so launching a step creates no event and takes
    no pinned allocation (whose caching allocator queries and records events of its own).

    Why: each CUDA call costs 3-10x its usual time on the first step after the host has idled (H100 host,
    benchmarks/host_idle.py: an event record 12.5 us hot, 62 us after 1 ms idle), which is the prefix-cache
    benchmark's warm request. A slot is reused SLOTS steps later; at most two steps (the one being collected and
    the one just launched) hold theirs."""

    SLOTS = 4

    def __init__(self):
        self.inputs = [torch.cuda.Event() for _ in range(self.SLOTS)]
        self.done = [torch.cuda.Event() for _ in range(self.SLOTS)]
        self.tokens: list[torch.Tensor] = []
        self.step = 0

    def next(self) -> None:
        """Move to the next step's slot."""
        self.step = (self.step + 1) % self.SLOTS

    def pinned_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """This step's pinned copy of the sampled token ids (enqueued, not awaited)."""
        n = token_ids.shape[0]
        if not self.tokens or self.tokens[0].shape[0] < n:
            # Grown rarely (the largest batch so far, at least 256 rows); in-flight steps keep their old buffers.
            self.tokens = [torch.empty(max(n, 256), dtype=torch.long, pin_memory=True) for _ in range(self.SLOTS)]
        return self.tokens[self.step][:n].copy_(token_ids, non_blocking=True)


class ModelRunner:
    """Owns the model, the KV cache tensors, the attention backend and the sampler."""

    def __init__(self, model: LlamaForCausalLM, hf_config, device: torch.device, dtype: torch.dtype, seed: int):
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.num_layers = hf_config.num_hidden_layers
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = hf_config.num_key_value_heads
        self.head_dim = head_dim_of(hf_config)
        self.vocab_size = hf_config.vocab_size
        self.sampler = Sampler(device, seed)
        self.kv_cache: list[torch.Tensor] = []
        self.backend: AttentionBackend | None = None
        self.block_size = 16
        self.graphs = None  # a CUDA-graph runner for small steps, set by the GPU path
        self.num_cascade_steps = 0
        self.supports_cascade = False
        # Tests set a list here to receive (request ids, sequence lengths, logits) of every step.
        self.logits_sink: list | None = None
        self.step_timing: dict | None = None  # shared with the engine when NANOVLLM_STEP_TIMING is set
        self.eos_ids: set[int] = set()
        self.kv_cache_storage: torch.Tensor | None = None
        self._inputs_event = None  # recorded once a step's host-staged inputs are enqueued (see launch)
        self._last_done = None  # the end event of the last step launched
        self._timed_done = None  # the last collected step's end event, when step timing is on
        self._buffers = StepBuffers() if device.type == "cuda" else None

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block takes across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * block_size * self.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """One tensor for all layers, viewed per layer as [num_blocks + 1, 2, Hkv, block_size, D] (HND).

        The extra last block is a scratch page that padded CUDA-graph rows write into; the block manager never
        hands it out.
        """
        self.block_size = block_size
        self.dummy_block = num_blocks
        shape = (self.num_layers, num_blocks + 1, 2, self.num_kv_heads, block_size, self.head_dim)
        self.kv_cache_storage = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_cache = list(self.kv_cache_storage.unbind(0))

    def build_metadata(self, out: SchedulerOutput) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the step's tokens and describe the batch for attention; also the rows to sample."""
        sched = out.scheduled
        ids: list[int] = []
        q_lens, starts, tables, sample_rows = [], [], [], []
        offset = 0
        for s in sched:
            chunk = s.req.all_token_ids[s.start : s.start + s.num_new_tokens]
            assert len(chunk) == s.num_new_tokens > 0, (s.req, s.start, s.num_new_tokens)
            ids.extend(chunk)
            q_lens.append(s.num_new_tokens)
            starts.append(s.start)
            tables.append(s.req.block_table)
            offset += s.num_new_tokens
            if s.samples:
                sample_rows.append(offset - 1)
        kv_lens = [st + q for st, q in zip(starts, q_lens)]
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        cu = torch.zeros(len(sched) + 1, dtype=torch.long)
        torch.cumsum(q_lens_t, 0, out=cu[1:])
        num_tokens = offset
        req_index = torch.repeat_interleave(torch.arange(len(sched)), q_lens_t)
        positions = torch.arange(num_tokens) - (cu[:-1] - torch.tensor(starts, dtype=torch.long))[req_index]
        tables_t = torch.tensor(padded, dtype=torch.int32)
        bs = self.block_size
        slots = tables_t[req_index, positions // bs].long() * bs + positions % bs
        cu_cpu = cu.to(torch.int32)
        # Two copies per step (one per dtype) from pinned memory: see to_device.
        input_ids, positions_d, slots_d, req_index_d = to_device(
            [torch.tensor(ids, dtype=torch.long), positions, slots, req_index], self.device
        )
        cu_d, kv_lens_d, tables_d = to_device([cu_cpu, torch.tensor(kv_lens, dtype=torch.int32), tables_t], self.device)
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            num_reqs=len(sched),
            positions=positions_d,
            slot_mapping=slots_d,
            cu_seqlens_q=cu_d,
            cu_seqlens_q_cpu=cu_cpu,
            kv_lens=kv_lens_d,
            block_tables=tables_d,
            req_index=req_index_d,
            q_lens_cpu=q_lens,
            kv_lens_cpu=kv_lens,
            block_tables_cpu=tables,
            is_decode=all(q == 1 for q in q_lens),
        )
        return input_ids, meta, sample_rows

    @torch.inference_mode()
    def forward_hidden(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Run the model eagerly over one step and return the final hidden states."""
        self.backend.plan(meta)
        self.inputs_sent()
        ctx = ForwardContext(positions=meta.positions, backend=self.backend, kv_cache=self.kv_cache)
        return self.model(input_ids, ctx)

    def _pending_inputs(self, out: SchedulerOutput, prev) -> tuple[list[int], list[int]] | None:
        # Rows of this step whose input token is still a placeholder (sampled by the step in flight), and where
        # that step's sampled-token tensor holds each value.
        if prev is None:
            return None
        rows_of = prev[1]
        dst, src = [], []
        offset = 0
        for s in out.scheduled:
            offset += s.num_new_tokens
            req = s.req
            if req.num_pending and s.start + s.num_new_tokens == req.num_tokens:
                dst.append(offset - 1)
                src.append(rows_of[req.serial])
        return (dst, src) if dst else None

    def patch_inputs(self, input_ids: torch.Tensor, pending, prev) -> None:
        """Copy tokens still on the device from the previous step's samples into this step's input ids."""
        if pending is None:
            return
        dst, src = to_device([torch.tensor(x, dtype=torch.long) for x in pending], self.device)
        input_ids.index_copy_(0, dst, prev[0].index_select(0, src))

    def warm_input_patch(self) -> None:
        """Run patch_inputs once on dummy tensors, so its kernels are loaded before the first request."""
        # Why: otherwise they first run in the first step launched while a prefill is still on the device, and the
        # first launch of a kernel (CUDA loads them lazily) may wait for the work in flight.
        ids = torch.zeros(2, dtype=torch.long, device=self.device)
        self.patch_inputs(ids, ([1], [0]), (torch.ones(1, dtype=torch.long, device=self.device),))
        torch.cuda.synchronize(self.device)

    def inputs_sent(self) -> None:
        """Mark that this step's host-staged inputs (ours and FlashInfer's plan buffers) are enqueued."""
        if self._buffers is not None:
            self._inputs_event = self._buffers.inputs[self._buffers.step]
            self._inputs_event.record()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, shared_prefix_blocks: int = 0, prev=None):
        """Enqueue one step (forward and sampling) on the device without waiting for it; collect() finishes it.

        prev is the in-flight step's (sampled-token tensor, {request serial: row}): inputs that are still
        placeholders are read from it on the device.
        """
        t0 = time.perf_counter()
        # Pinned staging buffers (ours and FlashInfer's plan) are rewritten below: the previous step must have
        # consumed them. It has nearly always: the step before it was collected, and its inputs go first.
        if self._inputs_event is not None:
            self._inputs_event.synchronize()
        self._last_done = None  # until this step records its end
        if self._buffers is not None:
            self._buffers.next()
        gpu_start = None
        if self.step_timing is not None and self.device.type == "cuda":
            gpu_start = torch.cuda.Event(enable_timing=True)
            gpu_start.record()
        if shared_prefix_blocks:
            self.num_cascade_steps += 1
        reqs = [s.req for s in out.scheduled if s.samples]
        pending = self._pending_inputs(out, prev)
        graphs = self.graphs
        decode_only = out.is_decode_only
        prefill_tokens = None
        if graphs is not None and not decode_only:
            prefill_tokens = graphs.prefill_size(out.num_tokens, len(out.scheduled))
        if graphs is not None and shared_prefix_blocks and graphs.fits_cascade(len(reqs)):
            kind = "graph_cascade"
            logits = graphs.cascade(reqs, shared_prefix_blocks, pending, prev)
        elif graphs is not None and not shared_prefix_blocks and decode_only and graphs.fits(len(reqs)):
            kind = "graph_decode"
            logits = graphs.decode(reqs, pending, prev)
        elif prefill_tokens is not None:
            kind = "graph_prefill"
            logits = graphs.prefill(out.scheduled, prefill_tokens, pending, prev)
        else:
            kind = "eager_cascade" if shared_prefix_blocks else "eager_decode" if decode_only else "eager_prefill"
            # The large-graph rule times eager prefill launches (and some steps on the device): GraphRunner.
            rule = graphs if graphs is not None and kind == "eager_prefill" else None
            eager_start = time.perf_counter()
            timed = rule.start_eager_timing(out.num_tokens, len(out.scheduled)) if rule is not None else None
            input_ids, meta, sample_rows = self.build_metadata(out)
            self.patch_inputs(input_ids, pending, prev)
            meta.shared_prefix_blocks = shared_prefix_blocks
            hidden = self.forward_hidden(input_ids, meta)
            if rule is not None:
                rule.note_eager_launch((time.perf_counter() - eager_start) * 1e3, timed)
            if not reqs:
                return None
            (rows,) = to_device([torch.tensor(sample_rows, dtype=torch.long)], self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        if self.logits_sink is not None:
            self.logits_sink.append(([r.request_id for r in reqs], [r.num_tokens for r in reqs], logits.float().cpu()))
        token_ids, logprobs, wanted = self.sampler.sample(logits, reqs, self.vocab_size, self.eos_ids)
        results = [token_ids]
        if logprobs is not None:
            results += logprob_tensors(logprobs, token_ids, wanted)
        done = None
        if self.device.type == "cuda":
            # Copy to pinned memory and mark the point: collect() waits for this step only, not for the next
            # step, which is usually enqueued behind it by then.
            buffers = self._buffers
            first = [buffers.pinned_tokens(token_ids)] if token_ids.dtype == torch.long else []
            results = first + [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in results[len(first) :]
            ]  # fmt: skip
            done = torch.cuda.Event(enable_timing=True) if gpu_start is not None else buffers.done[buffers.step]
            done.record()
            self._last_done = done
        if self.step_timing is not None:
            self.step_timing["launch"] = self.step_timing.get("launch", 0.0) + time.perf_counter() - t0
        timing = None if gpu_start is None else (gpu_start, kind)
        return token_ids, {r.serial: i for i, r in enumerate(reqs)}, results, done, wanted, timing

    @torch.inference_mode()
    def collect(self, handle):
        """Wait for a launched step; returns (sampled token ids per sampling request, logprob dicts or None)."""
        if handle is None:
            return [], None
        _, _, results, done, wanted, timing = handle
        if done is not None:
            done.synchronize()  # the one host sync of the step
            if done is self._last_done:
                # Nothing is in flight: the next launch need not ask the device whether inputs were consumed (a
                # CUDA call costs 3-10x its usual time when the host has been idle: docs/benchmarks.md).
                self._inputs_event = self._last_done = None
        if timing is not None:
            # Device time from the step's first enqueued work to its last (idle gaps inside an eager step count),
            # and the device's idle gap before the step (after the previous step, when that ran back to back).
            start, kind = timing
            st = self.step_timing
            st[f"gpu_s_{kind}"] = st.get(f"gpu_s_{kind}", 0.0) + start.elapsed_time(done) / 1e3
            st[f"n_{kind}"] = st.get(f"n_{kind}", 0) + 1
            prev_done, self._timed_done = self._timed_done, done
            if prev_done is not None:
                gap = max(prev_done.elapsed_time(start) / 1e3, 0.0)
                if gap < 0.1:  # longer gaps are the engine waiting for requests, not for the host
                    st[f"idle_s_{kind}"] = st.get(f"idle_s_{kind}", 0.0) + gap
        token_list = results[0].tolist()
        lp = None
        if len(results) > 1:
            lp = top_logprobs(*(t.tolist() for t in results[1:]), token_list, wanted)
        return token_list, lp

    def execute(self, out: SchedulerOutput, shared_prefix_blocks: int = 0):
        """Run one step to completion: launch() then collect()."""
        return self.collect(self.launch(out, shared_prefix_blocks))

    @torch.inference_mode()
    def profile_free_memory(self, config, max_model_len: int) -> int:
        """Bytes left for the KV cache after a warm-up at the largest step shape, under gpu_memory_utilization."""
        from engine.cuda_graphs import large_prefill_sizes
        from engine.request import Request
        from engine.sampling_params import SamplingParams
        from engine.scheduler import ScheduledRequest, SchedulerOutput

        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        bs = config.block_size
        total_tokens = min(config.max_num_batched_tokens, max_model_len * config.max_num_seqs)
        num_seqs = max(1, min(config.max_num_seqs, total_tokens))
        per_seq = max(1, min(total_tokens // num_seqs, max_model_len - 1))
        blocks_per_seq = -(-per_seq // bs)
        self.allocate_kv_cache(num_seqs * blocks_per_seq, bs)
        out = SchedulerOutput()
        # Filters with logprobs: the most memory a step's sampling takes (the torch path's sort and log-softmax over
        # the vocabulary per row where it serves them, else a log-softmax beside the kernels, which compile later:
        # Sampler.warm).
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=20)
        for i in range(num_seqs):
            req = Request([1] * per_seq, params)
            req.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            out.scheduled.append(ScheduledRequest(req, 0, per_seq))
        self.execute(out)
        self.sampler.request_generators.clear()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        warmup_kv = self.kv_cache_storage.nbytes  # part of the peak, not an activation
        self.kv_cache, self.kv_cache_storage = [], None
        torch.cuda.empty_cache()
        current = torch.cuda.memory_allocated(dev)
        free, total = torch.cuda.mem_get_info(dev)
        used = total - free
        # CUDA graphs keep their own pool (activations at the largest shape), FlashInfer's buffers and one logits
        # buffer for the largest batch; the largest prefill graph's activations are its share of the warm-up's.
        logits_bytes = max(config.max_num_seqs, 17) * self.vocab_size * torch.finfo(self.dtype).bits // 8
        largest = max(large_prefill_sizes(config.max_num_batched_tokens), default=0)
        prefill_graph = max(0, peak - current - warmup_kv) * largest // total_tokens
        graph_reserve = 0 if config.enforce_eager else 256 * 2**20 + logits_bytes + prefill_graph
        return int(total * config.gpu_memory_utilization - used - (peak - current) - graph_reserve)

    def release(self) -> None:
        """Drop the KV cache, graphs and model so their memory can be returned."""
        self.kv_cache = []
        self.kv_cache_storage = None
        self.graphs = None
        self.backend = None
        self.model = None
