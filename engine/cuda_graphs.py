"""CUDA graphs: decode per batch size, cascade decode per batch size, and prefill/mixed steps per token count (up
to 4,096 tokens where that pays on this host). FlashInfer wrappers read fixed buffers; plan() refills them outside
the graph."""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque

import numpy as np
import torch

from engine.attention.flashinfer_backend import (
    SKEWED_SPLITS,
    TWIN_PROGRAMS_PER_SM,
    GraphCascadeAttention,
    GraphDecodeAttention,
    GraphPrefillAttention,
    eager_prefill_backend,
    no_split_decode_min_batch,
    short_decode_limits,
    short_decode_pays,
    short_limits_at,
    skewed_variant_sizes,
    wave_short_tokens,
    whole_kv_pays,
    whole_kv_variant_sizes,
)
from engine.attention.triton_decode import split_buffers, triton_decode_supported
from engine.config import env_choice
from engine.layers.embedding import embedding_kernel_supported
from engine.models.llama import ForwardContext

logger = logging.getLogger("engine")

PREFILL_TOKEN_SIZES = (16, 32, 64, 128, 256, 512)
# Larger prefill/mixed steps (a new document, a long prompt) as graphs too, attending with FlashInfer's default
# kernel (fa3 on sm90). Why: an eager step launches ~12 kernels per layer from Python, and where that takes longer
# than the device needs, the step waits for the host: a 4,096-token step of Qwen3-0.6B has 11.6 ms of kernels and
# took 15-25 ms eagerly on an H100 host (docs/benchmarks.md, section 4). Sizes 1.5x apart bound the padding.
LARGE_PREFILL_TOKEN_SIZES = (768, 1024, 1536, 2048, 3072, 4096)
RULE_WINDOW = 3  # timings of each kind the large-graph rule takes the median of (see _recent_median)
PREFILL_GRAPH_REQUESTS = 16  # requests a prefill/mixed graph holds (plus one padding row)
STEP_TUNE_CONTEXT = 384  # tokens of context in the decode step that refine_row_plan times (a short chat turn)

# Rows of the per-step int64 input block (one pinned host copy, one H2D copy per step).
IDS, ROPE_POS, APPEND_POS, BATCH_IDX, LAST_LEN, SAMPLE_ROWS, SRC_ROW = range(7)


def step_tune_enabled() -> bool:
    """Whether the one-row GEMV choice is timed in the decode step before capture (NANOVLLM_STEP_TUNE, default 1)."""
    mode = os.environ.get("NANOVLLM_STEP_TUNE", "1")
    if mode not in ("0", "1"):
        raise ValueError(f"NANOVLLM_STEP_TUNE={mode!r} must be 0 or 1")
    return mode == "1"


def graph_warmup_mode() -> str:
    """NANOVLLM_GRAPH_WARMUP: "first" (default): an eager warm-up forward before the first graph of each kind and
    attention variant only; "each": before every graph (A/B runs)."""
    mode = os.environ.get("NANOVLLM_GRAPH_WARMUP", "first")
    if mode not in ("first", "each"):
        raise ValueError(f"NANOVLLM_GRAPH_WARMUP={mode!r} must be 'first' or 'each'")
    return mode


def large_prefill_graphs_mode() -> str:
    """NANOVLLM_LARGE_PREFILL_GRAPHS: "auto" (default): a graph of LARGE_PREFILL_TOKEN_SIZES serves a step while it
    replays no slower than the step would run eagerly on this host (GraphRunner.prefill_size); "1": always; "0":
    none is captured."""
    mode = os.environ.get("NANOVLLM_LARGE_PREFILL_GRAPHS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"NANOVLLM_LARGE_PREFILL_GRAPHS={mode!r} must be 'auto', '0' or '1'")
    return mode


def large_prefill_sizes(max_num_batched_tokens: int) -> list[int]:
    """The large prefill graph sizes captured under this step budget (none when NANOVLLM_LARGE_PREFILL_GRAPHS=0)."""
    if large_prefill_graphs_mode() == "0":
        return []
    return [t for t in LARGE_PREFILL_TOKEN_SIZES if t <= max_num_batched_tokens]


def input_block(width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The per-step int64 input rows (IDS ... SRC_ROW) for graphs of up to `width` tokens or requests: the device
    block the graphs read, its pinned host twin and a numpy view of that. Padding state: last-page length 1, and no
    token from the sampler's buffer (SRC_ROW -1)."""
    static = torch.zeros(7, width, dtype=torch.long, device=device)
    host = torch.zeros(7, width, dtype=torch.long).pin_memory()
    static[LAST_LEN].fill_(1)
    static[SRC_ROW].fill_(-1)
    host[SRC_ROW].fill_(-1)
    return static, host, host.numpy()


def _recent_median(history: deque, value: float) -> float:
    """Append a timing to its history (the latest RULE_WINDOW of one kind) and return their median."""
    # One hiccup of the host (a 79 ms launch among 19-21 ms ones, docs/benchmarks.md, section 8) must not flip
    # the next choice; a lasting change does, from its second step on.
    history.append(value)
    return statistics.median(history)


def _event_pair() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    # Start and end of a step on the device, read later with query() and elapsed_time(), never a wait.
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def twin_key(size: int, attn) -> tuple:
    """The graph key of a decode twin: ("decode", size, "whole_kv") when it plans unsplit, else (..., "split")."""
    return ("decode", size, "whole_kv" if attn.whole_kv else "split")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class GraphRunner:
    """Captures the model's forward for fixed step shapes and replays it with the step's inputs copied in."""

    def __init__(self, runner, config, max_model_len: int):
        self.runner = runner
        self.block_size = bs = config.block_size
        self.sizes = capture_sizes(config.max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.cascade_sizes = (
            [s for s in self.sizes if s >= config.cascade_min_requests] if config.enable_cascade_attention else []
        )
        self.large_prefill_sizes = large_prefill_sizes(config.max_num_batched_tokens)
        self.prefill_sizes = list(PREFILL_TOKEN_SIZES) + self.large_prefill_sizes
        self.prefill_rows = min(config.max_num_seqs, PREFILL_GRAPH_REQUESTS) + 1
        width = max([self.max_bs, self.prefill_rows, *PREFILL_TOKEN_SIZES])
        dev = runner.device
        self.static, self.host, self.host_np = input_block(width, dev)
        # The large prefill graphs read a block of their own: every replay copies its whole block, and decode steps
        # should copy a few KiB, not the 192 KiB a 4,096-token block takes.
        self.large_inputs = input_block(max(self.large_prefill_sizes), dev) if self.large_prefill_sizes else None
        self.logits = torch.empty(
            max(self.max_bs, self.prefill_rows), runner.vocab_size, dtype=runner.dtype, device=dev
        )
        # The sampler's token buffer, sized once for the largest step so it stays where the graphs read it: a
        # graph takes a row's input token from it where the step before sampled it (engine/layers/embedding.py).
        # NANOVLLM_INPUT_PATCH=ops: patch them into the input ids before each replay instead (A/B runs).
        fused = runner.sampler.fused
        embed = runner.model.embed_tokens.weight
        in_graph = env_choice("NANOVLLM_INPUT_PATCH", "graph", ("graph", "ops")) == "graph"
        usable = in_graph and fused is not None and embedding_kernel_supported(embed)
        self.sampled = fused.tokens(config.max_num_seqs) if usable else None
        self.max_pages = pages = -(-max_model_len // bs)
        ws = runner.backend.workspace
        self.decode_attn = {b: GraphDecodeAttention(runner, bs, ws, b, pages) for b in self.sizes}
        # Twins of the tensor-core decode graphs with the other KV plan, chosen per step by whole_kv_pays: unsplit
        # ones where the size's own graph splits, Triton split-KV ones where it plans unsplit (FlashInfer's graph
        # planner cannot split there).
        first_unsplit = no_split_decode_min_batch(dev, runner.num_kv_heads)
        self.twin_attn = {
            b: GraphDecodeAttention(runner, bs, ws, b, pages, whole_kv=True)
            for b in whole_kv_variant_sizes(self.sizes, first_unsplit)
        }
        skewed = skewed_variant_sizes(self.sizes, first_unsplit)
        self.short_decode = short_decode_limits()
        self.wave_tokens = wave_short_tokens()
        self.short_limits: dict[int, tuple[int, int]] = {}  # per Triton twin size (short_limits_at)
        if skewed and triton_decode_supported(runner.head_dim, bs, dev):
            # One set of partial-state buffers for all of them: one graph runs at a time.
            buffers = split_buffers(
                skewed[-1] * runner.num_heads * SKEWED_SPLITS, skewed[-1] * runner.num_kv_heads, runner.head_dim, dev
            )
            mean_chunk = self.short_decode[0] > 0  # 0: the twins as they were, every context split
            for b in skewed:
                self.twin_attn[b] = GraphDecodeAttention(
                    runner, bs, ws, b, pages, whole_kv=False, skewed=(SKEWED_SPLITS, buffers, mean_chunk)
                )
                self.short_limits[b] = self.short_decode
            self._wave_limits()  # nothing launched yet: the measured count, until capture asks the driver
        self.cascade_attn = {b: GraphCascadeAttention(runner, bs, ws, b, pages) for b in self.cascade_sizes}
        large_backend = eager_prefill_backend()  # "auto": FlashInfer's choice, fa3 on sm90
        self.prefill_attn = {
            t: GraphPrefillAttention(
                runner, bs, ws, self.prefill_rows, t, pages, large_backend if t > PREFILL_TOKEN_SIZES[-1] else "fa2"
            )
            for t in self.prefill_sizes
        }
        # "auto" mode: each large graph's replay time (capture() measures it), the host time of launching an
        # eager step (capture() measures a first one, then note_eager_launch), how many times its start-up replay
        # a large graph step takes on the device (device_pace: clocks drop under sustained load) and how many
        # times longer than both its launch and its kernels at that pace an eager step of this range keeps the
        # device (eager_excess); launch, pace and excess are each the median of their latest RULE_WINDOW
        # timings. Without them ("1"): always replay.
        self.large_replay_ms: dict[int, float] = {}
        self.eager_launch_ms = float("inf")
        self.device_pace = 1.0
        self.eager_excess = 1.0
        self._launches: deque[float] = deque(maxlen=RULE_WINDOW)
        self._paces: deque[float] = deque(maxlen=RULE_WINDOW)
        self._excesses: deque[float] = deque(maxlen=RULE_WINDOW)
        self._eager_timed: tuple | None = None  # (start event, end event, launch ms, tokens) until the step ends
        self._graph_timed: tuple | None = None  # (start event, end event, graph tokens) until the step ends
        # Keyed (kind, size), and ("decode", size, "whole_kv" | "split") for the twins.
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.planned: dict[tuple, tuple] = {}  # page layout of each graph's last plan()
        self.num_plans = 0
        self.replays: dict[str, int] = {"decode": 0, "cascade": 0, "prefill": 0}  # steps served per graph kind
        self.prefill_replays: dict[int, int] = {}  # prefill/mixed steps served per captured token count
        self.pool_bytes = 0

    # ---- capture ----

    def _plan_padding(self, kind: str, attn) -> None:
        dummy = self.runner.dummy_block
        if kind == "decode":
            attn.plan_rows([], [], dummy)
        elif kind == "cascade":
            attn.plan_cascade([], [], 0, dummy)
        else:
            attn.plan_step([], [], [], dummy)

    def _forward(self, kind: str, attn, n: int) -> torch.Tensor:
        # Inside the graph: int64 -> int32 copies of the append coordinates (and last-page lengths for decode, which
        # change every step while the page lists do not; the fused decode kernel needs none), then the model and
        # the lm_head.
        s = self._inputs(kind, n)[0]
        if attn.fused_decode:
            attn.last_len = s[LAST_LEN, :n]  # its kernel reads the int64 rows itself and appends by the page table
        else:
            attn.positions.copy_(s[APPEND_POS, :n])
            if kind == "prefill":
                attn.batch_indices.copy_(s[BATCH_IDX, :n])
            else:
                attn.kv_last.copy_(s[LAST_LEN, :n])
        model = self.runner.model
        rows = None if self.sampled is None else (s[SRC_ROW, :n], self.sampled)
        hidden = model(s[IDS, :n], ForwardContext(s[ROPE_POS, :n], attn, self.runner.kv_cache, rows))
        if kind == "prefill":
            hidden = hidden.index_select(0, s[SAMPLE_ROWS, : attn.rows])
        # Every graph writes its logits into one buffer, so graphs do not each keep a [rows, vocab] output.
        return model.compute_logits(hidden, out=self.logits[: hidden.shape[0]])

    @torch.inference_mode()
    def decode_step_us(self, context: int = STEP_TUNE_CONTEXT, rows: int = 1, reps: int = 8) -> float:
        """Microseconds per replay of the decode step graph for `rows` requests (a captured size), recorded now,
        each at a `context`-token context.

        The context is the scratch page listed once per page, and the step appends there, so no request's KV is
        touched; that graph is re-planned before its next real step."""
        from engine.layers.linear import graph_time_us

        attn, bs, dummy, s = self.decode_attn[rows], self.block_size, self.runner.dummy_block, self.static
        pages = max(1, min(self.max_pages, context // bs))
        attn.plan_rows([[dummy] * pages] * rows, [pages * bs] * rows, dummy)
        self.planned.pop(("decode", rows), None)
        s[ROPE_POS, :rows] = s[APPEND_POS, :rows] = pages * bs - 1
        s[LAST_LEN, :rows] = bs
        try:
            return graph_time_us(lambda: self._forward("decode", attn, rows), reps)
        finally:
            s[ROPE_POS, :rows] = s[APPEND_POS, :rows] = 0
            s[LAST_LEN, :rows] = 1

    def refine_row_plan(self) -> None:
        """Choose each role's one-row GEMV configuration among those tune_gemv ranked fastest alone, by timing the
        batch-1 decode step graph itself (decode_step_us), one role at a time (NANOVLLM_STEP_TUNE=0 keeps the
        ranking's first)."""
        model = self.runner.model
        alternatives = model.gemv_alternatives
        if not step_tune_enabled() or not alternatives or 1 not in self.decode_attn:
            return
        start = time.perf_counter()
        plan = dict(model.layers[0].gemv_plan)
        first = best = self.decode_step_us()
        for role, configs in alternatives.items():
            for cfg in configs:
                if cfg == plan[role]:
                    continue
                model.set_row_plan({**plan, role: cfg})
                t = self.decode_step_us()
                if t < best:
                    plan, best = {**plan, role: cfg}, t
        model.set_row_plan(plan)
        logger.info(
            "one-row GEMVs timed in the decode step (%.1fs): %.1f -> %.1f us per step with %s",
            time.perf_counter() - start,
            first,
            best,
            "; ".join(f"{role} {cfg}" for role, cfg in plan.items()),
        )

    def _shapes(self) -> list[tuple[tuple, object]]:
        """(graph key, attention) of every graph to record, largest first within a kind."""
        shapes = [(("prefill", t), a) for t, a in sorted(self.prefill_attn.items(), reverse=True)]
        shapes += [(("decode", b), a) for b, a in sorted(self.decode_attn.items(), reverse=True)]
        shapes += [(twin_key(b, a), a) for b, a in sorted(self.twin_attn.items(), reverse=True)]
        shapes += [(("cascade", b), a) for b, a in sorted(self.cascade_attn.items(), reverse=True)]
        return shapes

    @staticmethod
    def _split_config(attn) -> tuple | None:
        """(split count, mean chunk) of the attention's split-KV Triton kernel, None where it has none."""
        kernel = getattr(attn, "split_decode", None)
        return kernel and (kernel.splits, kernel.mean_chunk)

    @torch.inference_mode()
    def precompile_split_decode(self) -> int:
        """Compile every configuration of the split-KV Triton decode kernel that the graphs use, side by side, before
        the first one is timed or recorded; returns how many there were.

        Why: each compiles on its first launch in about a second, and the graphs' warm-ups met them one after another
        (nine for Qwen3-0.6B: most of a first start's graph phase, docs/benchmarks.md, section 10). One warm-up forward
        per configuration (split count and mode per graph kind) runs with the kernel's launches deferred, which notes
        each compile with its exact arguments; warm_in_threads then runs those. On a warm Triton cache this costs a
        few eager forwards."""
        from engine.attention.triton_decode import deferred_compiles
        from engine.layers.linear import warm_in_threads

        start = time.perf_counter()
        first: dict[tuple, tuple[tuple, object]] = {}
        for key, attn in self._shapes():
            split = self._split_config(attn)
            if split is not None:
                first.setdefault((key[0], attn.fused_decode, split), (key, attn))
        with deferred_compiles() as calls:
            for (kind, n, *_), attn in first.values():
                self._plan_padding(kind, attn)
                self._forward(kind, attn, n)
        warm_in_threads(list(calls.values()), self.runner.device)
        if calls:
            logger.info("split-KV decode kernel: %d configurations compiled or loaded side by side in %.1fs",
                        len(calls), time.perf_counter() - start)  # fmt: skip
        return len(calls)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record every graph, largest first within a kind so the shared pool is sized once."""
        self.precompile_split_decode()
        self.refine_row_plan()
        start = time.perf_counter()
        dev = self.runner.device
        before = torch.cuda.memory_reserved(dev)
        pool = None
        warm_each, warmed = graph_warmup_mode() == "each", set()
        for key, attn in self._shapes():
            kind, n = key[:2]
            self._plan_padding(kind, attn)
            variant = (kind, *key[2:], attn.fused_decode, self._split_config(attn))
            if warm_each or variant not in warmed:
                # Outside the graph, once per variant: the lazy inits (library handles, workspaces, FlashInfer's
                # modules). Later sizes differ only in shapes, whose kernels load while they are recorded.
                self._forward(kind, attn, n)
                torch.cuda.synchronize(dev)
                warmed.add(variant)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(kind, attn, n)
            if pool is None:
                pool = graph.pool()
            self.graphs[key] = (graph, out)
        torch.cuda.synchronize(dev)
        self.pool_bytes = torch.cuda.memory_reserved(dev) - before
        self._wave_limits()
        if self.large_prefill_sizes and large_prefill_graphs_mode() == "auto":
            self.time_large_prefill()
        logger.info(
            "captured %d CUDA graphs (decode batch %s, also unsplit at %s and Triton split-KV at %s; cascade batch %s; "
            "prefill tokens %s) in %.1fs, %.0f MiB",
            len(self.graphs),
            ",".join(map(str, self.sizes)),
            ",".join(str(b) for b, a in self.twin_attn.items() if a.whole_kv) or "-",
            ",".join(str(b) for b, a in self.twin_attn.items() if not a.whole_kv) or "-",
            ",".join(map(str, self.cascade_sizes)) or "-",
            ",".join(map(str, self.prefill_sizes)) or "-",
            time.perf_counter() - start,
            self.pool_bytes / 2**20,
        )

    def _wave_limits(self) -> None:
        """Each Triton twin's short-decode limits from the programs per SM of its kernel as captured (the driver's
        count; TWIN_PROGRAMS_PER_SM where it cannot say), so the wave rule follows the kernel's registers and shared
        memory (head_dim, fused q/k) instead of the one shape it was measured on."""
        sms = torch.cuda.get_device_properties(self.runner.device).multi_processor_count
        for b in self.short_limits:
            per_sm = self.twin_attn[b].split_decode.resident_per_sm() or TWIN_PROGRAMS_PER_SM
            self.short_limits[b] = short_limits_at(
                b, self.runner.num_kv_heads, sms, self.short_decode, per_sm, self.wave_tokens
            )
            logger.debug("Triton twin of %d requests: %d programs per SM, short limits %s", b, per_sm,
                         self.short_limits[b])  # fmt: skip

    def time_large_prefill(self) -> None:
        """Time each large prefill graph's replay, and one eager launch of the model from this thread as the first
        estimate of eager_launch_ms (it counts as one of the launches whose median the rule reads: see
        prefill_size)."""
        from engine.layers.linear import replay_us

        dev, small = self.runner.device, self.large_prefill_sizes[0]
        attn = self.prefill_attn[small]
        launches = []
        for _ in range(3):
            self._plan_padding("prefill", attn)
            torch.cuda.synchronize(dev)
            start = time.perf_counter()
            self._forward("prefill", attn, small)
            launches.append((time.perf_counter() - start) * 1e3)
            torch.cuda.synchronize(dev)
        self.eager_launch_ms = _recent_median(self._launches, min(launches))
        for t in self.large_prefill_sizes:
            self._plan_padding("prefill", self.prefill_attn[t])
            self.large_replay_ms[t] = replay_us(self.graphs[("prefill", t)][0]) / 1e3
            self.prefill_attn[t].planned_shape = None  # planned for padding above: the next step plans afresh
        logger.info(
            "large prefill graphs replay in %s ms; an eager step took %.1f ms to launch at start-up (each such graph "
            "serves while it replays no slower than the step would take eagerly: the longer of its launch and its "
            "kernels, times the excess eager steps show, both at the pace graph steps show)",
            ", ".join(f"{t} tokens {ms:.1f}" for t, ms in self.large_replay_ms.items()),
            self.eager_launch_ms,
        )

    def start_eager_timing(self, num_tokens: int, num_reqs: int) -> tuple | None:
        """Before an eager prefill step is launched: (start event, end event, tokens), the start recorded now, when
        a large graph could have served the step, for note_eager_launch to time its device span; otherwise None."""
        if not self.times_eager(num_tokens, num_reqs):
            return None
        timed = (*_event_pair(), num_tokens)
        timed[0].record()
        return timed

    def note_eager_launch(self, ms: float, timed: tuple | None = None) -> None:
        """After an eager prefill step is launched: record the host time its launch took (the rule reads the
        median of the latest ones: the host's speed drifts) and, with start_eager_timing's `timed`, mark its end to
        read its device span."""
        self.eager_launch_ms = _recent_median(self._launches, ms)
        if timed is not None:
            timed[1].record()
            self._eager_timed = (*timed[:2], ms, timed[2])

    def times_eager(self, num_tokens: int, num_reqs: int) -> bool:
        """Whether an eager prefill step of this shape is one a large graph could have served, so that its device
        span is worth timing (prefill_size compares it with the graph's replay)."""
        return bool(self.large_replay_ms) and num_reqs < self.prefill_rows and num_tokens <= max(self.large_replay_ms)

    def kernel_ms(self, num_tokens: int) -> float:
        """The device time of a prefill step's kernels at this token count: the large graphs' replay times,
        linearly interpolated (zero tokens take zero time)."""
        lo_t, lo_ms = 0, 0.0
        for t, ms in sorted(self.large_replay_ms.items()):
            if num_tokens <= t:
                return lo_ms + (ms - lo_ms) * (num_tokens - lo_t) / (t - lo_t)
            lo_t, lo_ms = t, ms
        return lo_ms * num_tokens / lo_t if lo_t else 0.0

    def graph_timing(self, t: int) -> tuple | None:
        """For a step on the large prefill graph of t tokens: (start event, end event, t) for _replay to record
        around the replay, so that the next choice reads how fast the device runs it now; otherwise None."""
        if t not in self.large_replay_ms:
            return None
        return (*_event_pair(), t)

    def _settle_timings(self) -> None:
        # Read the last timed graph and eager steps once the device is past them (a query, never a wait). A graph
        # step gives the device's pace against its start-up replay: under sustained load its clocks drop (a
        # 4,096-token Qwen3-8B step took ~10% longer than at start-up, docs/benchmarks.md, section 8), which
        # slows graph and eager kernels alike. An eager step gives its excess over the longer of its launch and
        # its kernels at that pace: where the host launches about as fast as the device runs, each hiccup of the
        # host idles the device.
        if self._graph_timed is not None and self._graph_timed[1].query():
            start, end, t = self._graph_timed
            self._graph_timed = None
            self.device_pace = _recent_median(self._paces, max(0.5, start.elapsed_time(end) / self.large_replay_ms[t]))
        if self._eager_timed is not None and self._eager_timed[1].query():
            start, end, launch_ms, tokens = self._eager_timed
            self._eager_timed = None
            bound = max(launch_ms, self.device_pace * self.kernel_ms(tokens), 1e-3)
            self.eager_excess = _recent_median(self._excesses, max(1.0, start.elapsed_time(end) / bound))

    # ---- replay ----

    def fits(self, num_reqs: int) -> bool:
        """Whether a decode batch of this many requests has a captured graph."""
        return num_reqs <= self.max_bs

    def fits_cascade(self, num_reqs: int) -> bool:
        """Whether a cascade decode batch of this many requests has a captured graph."""
        return bool(self.cascade_sizes) and num_reqs <= self.cascade_sizes[-1]

    def prefill_size(self, num_tokens: int, num_reqs: int) -> int | None:
        """The captured token count for a prefill/mixed step, or None when it runs eagerly: also when it needs a
        large graph that replays slower than the step would take eagerly. An eager step takes as long as the
        longer of its launch (on this host, lately) and its kernels (kernel_ms, unpadded), times the excess timed
        eager steps showed; the graph takes its replay, padding included; kernels and replay at the pace graph
        steps showed (each of the three: the median of the latest RULE_WINDOW timings)."""
        if num_reqs >= self.prefill_rows:
            return None
        t = next((t for t in self.prefill_sizes if t >= num_tokens), None)
        if t is None or t not in self.large_replay_ms:
            return t
        self._settle_timings()
        pace = self.device_pace
        eager_ms = max(self.eager_launch_ms, pace * self.kernel_ms(num_tokens)) * self.eager_excess
        return t if pace * self.large_replay_ms[t] <= eager_ms else None

    def _inputs(self, kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """The input block a graph of this kind and size reads (input_block)."""
        if kind == "prefill" and n > PREFILL_TOKEN_SIZES[-1]:
            return self.large_inputs
        return self.static, self.host, self.host_np

    def _replay(self, key: tuple, n: int, pending, prev, timed: tuple | None = None) -> torch.Tensor:
        static, host, h = self._inputs(*key[:2])
        # Input tokens the step in flight samples: read from the sampler's buffer by the graph's first kernel when
        # they are there (fused sampling), else patched into the input ids on the device before the replay.
        in_graph = pending is not None and self.sampled is not None and prev[0].data_ptr() == self.sampled.data_ptr()
        if self.sampled is not None:
            h[SRC_ROW, : key[1]] = -1
            if in_graph:
                h[SRC_ROW, pending[0]] = pending[1]
        static.copy_(host, non_blocking=True)  # one copy, whatever the shape
        if not in_graph:
            self.runner.patch_inputs(static[IDS], pending, prev)
        self.runner.inputs_sent()
        graph, logits = self.graphs[key]
        if timed is not None:
            timed[0].record()
        graph.replay()
        if timed is not None:
            timed[1].record()
            self._graph_timed = timed
        self.replays[key[0]] += 1
        return logits[:n]

    def _fill_decode_rows(self, reqs: list, bs: int, shift: int) -> list[int]:
        n = len(reqs)
        h = self.host_np
        h[IDS, :n] = [r.all_token_ids[-1] for r in reqs]
        h[ROPE_POS, :n] = positions = [r.num_tokens - 1 for r in reqs]
        h[APPEND_POS, :n] = [p - shift for p in positions]
        h[LAST_LEN, :n] = [p % self.block_size + 1 for p in positions]
        h[IDS : APPEND_POS + 1, n:bs] = 0  # padded rows: token 0 at position 0 of the dummy block (one entry)
        h[LAST_LEN, n:bs] = 1
        return positions

    def _decode_like(self, kind: str, sizes: list[int], reqs: list, shared_blocks: int, pending, prev) -> torch.Tensor:
        # Decode and cascade decode: one row per request; the append positions are relative to each row's own
        # pages (after the shared_blocks shared ones). FlashInfer's decode plan depends on the page lists, not on
        # how full the last page is: re-plan only when a request gains a page or the batch changes (every
        # block_size steps at batch 1).
        bs = next(s for s in sizes if s >= len(reqs))
        positions = self._fill_decode_rows(reqs, bs, shared_blocks * self.block_size)
        block = self.block_size
        layout = (shared_blocks,) + tuple(
            (r.block_table[0], len(r.block_table), p // block) for r, p in zip(reqs, positions)
        )
        kv_lens = [p + 1 for p in positions]  # each request's tokens, this step's included
        key, attn = (kind, bs), self.cascade_attn[bs] if kind == "cascade" else self.decode_attn[bs]
        if kind == "decode" and bs in self.twin_attn and self._takes_twin(attn, kv_lens):
            attn = self.twin_attn[bs]
            key = twin_key(bs, attn)
        if self.planned.get(key) != layout:
            tables = [r.block_table for r in reqs]
            dummy = self.runner.dummy_block
            if kind == "cascade":
                attn.plan_cascade(tables, kv_lens, shared_blocks, dummy)
            else:
                attn.plan_rows(tables, kv_lens, dummy)
            self.planned[key] = layout
            self.num_plans += 1
        return self._replay(key, len(reqs), pending, prev)

    def _takes_twin(self, attn, kv_lens: list[int]) -> bool:
        # A Triton twin takes steps of short contexts (short_decode_pays); any twin takes the other KV plan when the
        # contexts' spread asks for it (whole_kv_pays). An unsplit size with a twin is a Triton twin's size, so it
        # has its limits in short_limits.
        if attn.whole_kv and short_decode_pays(kv_lens, self.short_limits[attn.rows]):
            return True
        return attn.whole_kv != whole_kv_pays(kv_lens)

    def decode(self, reqs: list, pending=None, prev=None) -> torch.Tensor:
        """Logits [n, vocab] for one decode step of reqs, by graph replay; no per-step tensor building."""
        return self._decode_like("decode", self.sizes, reqs, 0, pending, prev)

    def cascade(self, reqs: list, shared_blocks: int, pending=None, prev=None) -> torch.Tensor:
        """Logits [n, vocab] for one cascade decode step: the first shared_blocks blocks are common to all."""
        return self._decode_like("cascade", self.cascade_sizes, reqs, shared_blocks, pending, prev)

    def prefill(self, scheduled: list, t: int, pending=None, prev=None) -> torch.Tensor:
        """Logits [num sampling requests, vocab] for a prefill/mixed step, padded to the captured token count t
        (from prefill_size)."""
        h = self._inputs("prefill", t)[2]
        attn = self.prefill_attn[t]
        offset, samples = 0, []
        for i, s in enumerate(scheduled):
            end, stop = offset + s.num_new_tokens, s.start + s.num_new_tokens
            # From the prompt's packed bytes and an arange: a list or range into numpy costs ~0.1 ms per 4k tokens.
            h[IDS, offset:end] = np.frombuffer(s.req.span_bytes(s.start, stop), dtype="<i8")
            h[ROPE_POS, offset:end] = h[APPEND_POS, offset:end] = np.arange(s.start, stop)
            h[BATCH_IDX, offset:end] = i
            offset = end
            if s.samples:
                samples.append(end - 1)
        pad = t - offset
        h[IDS, offset:t] = 0
        h[ROPE_POS, offset:t] = h[APPEND_POS, offset:t] = np.arange(pad)
        h[BATCH_IDX, offset:t] = attn.rows - 1  # the padding row: causal over dummy pages
        h[SAMPLE_ROWS, : attn.rows] = 0
        h[SAMPLE_ROWS, : len(samples)] = samples
        self.num_plans += attn.plan_step(
            [s.num_new_tokens for s in scheduled],
            [s.req.block_table for s in scheduled],
            [s.start + s.num_new_tokens for s in scheduled],
            self.runner.dummy_block,
        )
        self.prefill_replays[t] = self.prefill_replays.get(t, 0) + 1
        return self._replay(("prefill", t), len(samples), pending, prev, self.graph_timing(t))
