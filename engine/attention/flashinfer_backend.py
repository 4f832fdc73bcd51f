"""FlashInfer attention over the engine's paged HND cache: eager prefill/decode/cascade, and fixed-buffer
variants that CUDA graphs capture (decode, cascade decode, small prefill/mixed steps)."""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from engine.attention.base import AttentionBackend, AttentionMetadata, pin_host, to_device
from engine.attention.triton_decode import (
    SplitDecode,
    fused_decode_enabled,
    triton_decode_max_rows,
    triton_decode_supported,
)
from engine.config import env_choice, env_whole_number
from engine.layers.fused_qkv import fused_qkv_available, qk_norm_rope_append

WORKSPACE_BYTES = 256 * 1024 * 1024
# Batch size from which decode attention uses FlashInfer's tensor-core kernel. Measured on an H100 (A/B in one run,
# docs/benchmarks.md): 64 requests with 4k-token contexts decode 1.65x faster with it; the nano-vllm throughput
# workload is unchanged; the GPU kit measured it slower at batch 1. NANOVLLM_TC_DECODE_MIN_BATCH overrides (A/B runs).
TENSOR_CORE_DECODE_MIN_BATCH = int(os.environ.get("NANOVLLM_TC_DECODE_MIN_BATCH", "16"))
# CUDA-graph tensor-core decode plans without split-KV from the batch size where FlashInfer's graph-mode planner has
# no room left to split: its grid is fixed at max(rows, 2 x SMs / KV heads) work items per KV head (33 on an H100
# with 8 KV heads), so from there on every request is one item whatever the split plan says, and splitting only
# adds a merge kernel per layer. Measured on an H100 (`gpu_bench.py skewed_decode`, docs/benchmarks.md): at 64 and
# 128 requests FlashInfer's split graph decoded no faster than the unsplit one even with one 16k-token context among
# 256-token ones (unsplit / split 1.00-1.07), and with similar contexts the unsplit graph is faster (decode step
# 6.63 -> 6.47 ms on the throughput workload; +4.7% at 48 requests in `decode_ab`).
# Every tensor-core decode graph has a twin with the other KV plan: below that size an unsplit one, from there on
# a split-KV one that attends with the Triton kernel of the small graphs (SKEWED_SPLITS). A step takes the unsplit
# graph unless its longest context is more than WHOLE_KV_MAX_OVER_MEAN times the mean and more than
# WHOLE_KV_MAX_SHARE of the step's KV tokens. Why: with contexts of similar length the unsplit graph decodes
# 4.3-5.2% faster at 16 and 32 requests (`decode_ab`) and FlashInfer's unsplit kernel beats the Triton one at
# 64-128 (by up to 13%), but without split-KV each request's KV is read by one program per KV head, so one long
# context among short ones is read serially while the rest of the GPU waits: one 16k-token context among 256-token
# ones decodes 2.9x faster split at 16 requests and 2.0x at 64 (`gpu_bench.py skewed_decode`, docs/benchmarks.md).
# Measured there, the graphs cross between 2.5x and 3.1x the mean at 16 requests, at about 2.5x at 32 (where the
# FlashInfer split graph can add one chunk only), and at a share of about 1/16 at 64 and 128.
WHOLE_KV_MAX_OVER_MEAN = 2.5
WHOLE_KV_MAX_SHARE = 1 / 16


def whole_kv_variant_sizes(sizes: list[int], first_unsplit: int) -> list[int]:
    """The captured decode sizes that also get an unsplit (whole-KV) graph: tensor-core sizes below first_unsplit
    (none when it is 0, which always splits)."""
    return [b for b in sizes if first_unsplit > 0 and TENSOR_CORE_DECODE_MIN_BATCH <= b < first_unsplit]


# From that size on, the split-KV twin is the Triton kernel of the small decode graphs (triton_decode.py), which
# splits every request's pages into up to this many chunks per KV head whatever the batch size, so a long context
# among short ones is read by many programs; with the chunks of the FlashInfer graph it could not be split at all.
SKEWED_SPLITS = 16


def skewed_variant_sizes(sizes: list[int], first_unsplit: int) -> list[int]:
    """The captured decode sizes that also get a Triton split-KV graph for steps with one dominant context: the
    unsplit tensor-core sizes (none when first_unsplit is 0, which always splits with FlashInfer)."""
    return [b for b in sizes if 0 < first_unsplit <= b and b >= TENSOR_CORE_DECODE_MIN_BATCH]


def whole_kv_pays(kv_lens: list[int]) -> bool:
    """Whether a decode step of these context lengths should take the unsplit graph (see WHOLE_KV_MAX_OVER_MEAN)."""
    longest, total = max(kv_lens), sum(kv_lens)
    return longest * len(kv_lens) <= WHOLE_KV_MAX_OVER_MEAN * total or longest <= WHOLE_KV_MAX_SHARE * total


# Those Triton twins also serve steps of at most SHORT_DECODE_MAX_ROWS requests whose contexts are short on average,
# whatever their spread: there one program per request and KV head (no split up to the mean context, SplitDecode's
# mean_chunk) reads the KV faster than FlashInfer's unsplit tensor-core kernel (docs/benchmarks.md, section 6).
# NANOVLLM_SHORT_DECODE_TOKENS and NANOVLLM_SHORT_DECODE_MAX_ROWS override the limits (A/B runs; tokens 0: never,
# and the twins split every context into up to SKEWED_SPLITS chunks).
SHORT_DECODE_TOKENS = 1024
SHORT_DECODE_MAX_ROWS = 128


def short_decode_limits() -> tuple[int, int]:
    """(mean context in tokens, most requests) up to which a decode step of an unsplit tensor-core size takes its
    Triton twin: NANOVLLM_SHORT_DECODE_TOKENS (default SHORT_DECODE_TOKENS; 0 = never) and
    NANOVLLM_SHORT_DECODE_MAX_ROWS (default SHORT_DECODE_MAX_ROWS)."""
    tokens = env_whole_number("NANOVLLM_SHORT_DECODE_TOKENS", SHORT_DECODE_TOKENS, "tokens (0 = off)")
    return tokens, env_whole_number("NANOVLLM_SHORT_DECODE_MAX_ROWS", SHORT_DECODE_MAX_ROWS, "requests")


def short_decode_pays(kv_lens: list[int], limits: tuple[int, int]) -> bool:
    """Whether a decode step of these context lengths is short enough on average, and small enough, for the Triton
    twin of an unsplit tensor-core graph: limits as short_decode_limits() gives them."""
    tokens, rows = limits
    return 0 < tokens and len(kv_lens) <= rows and sum(kv_lens) <= tokens * len(kv_lens)


# Under the mean split a step of similar contexts gives the Triton twin one program per request and KV head, and its
# kernel fits five at once on an SM (sm90, head_dim 128). Just past that a second, mostly idle wave follows:
# attention alone took 1.21-1.43x as long at 84-96 requests as at 80, where FlashInfer's unsplit kernel took
# 1.03-1.16x (H200, 8 KV heads, 132 SMs, contexts of 640 and 896 tokens: benchmarks/split_grid_probe.py), and the
# 96-request twin decoded 2.7-7.8% slower than FlashInfer's graph at mean contexts of 385-1,024 tokens while it won
# by 2.4% at 129-384 (`gpu_bench.py decode_ab`, docs/benchmarks.md section 6). Two programs per mean context did not
# help there (6.7-7.5% slower than FlashInfer's graph). So where a size's programs fill between the kernel's resident
# programs per SM and TWIN_WAVE_SLACK times that, the short rule keeps the twin only up to WAVE_SHORT_DECODE_TOKENS.
# The graph runner asks the driver how many programs of the twin's compiled kernel an SM holds
# (SplitDecode.resident_per_sm); TWIN_PROGRAMS_PER_SM is the count measured above, used where it cannot say.
# NANOVLLM_WAVE_SHORT_DECODE_TOKENS overrides the cut (A/B runs at a cut size: NANOVLLM_SHORT_DECODE_TOKENS alone
# cannot lift it, since the smaller limit wins).
TWIN_PROGRAMS_PER_SM = 5
TWIN_WAVE_SLACK = 1.3
WAVE_SHORT_DECODE_TOKENS = 384


def wave_short_tokens() -> int:
    """The short-decode token limit at sizes whose twin just overfills a wave: NANOVLLM_WAVE_SHORT_DECODE_TOKENS
    (default WAVE_SHORT_DECODE_TOKENS)."""
    return env_whole_number("NANOVLLM_WAVE_SHORT_DECODE_TOKENS", WAVE_SHORT_DECODE_TOKENS, "tokens")


def short_limits_at(
    rows: int,
    num_kv_heads: int,
    num_sms: int,
    limits: tuple[int, int],
    per_sm: int = TWIN_PROGRAMS_PER_SM,
    wave_tokens: int = WAVE_SHORT_DECODE_TOKENS,
) -> tuple[int, int]:
    """The short-decode limits (short_decode_limits()) for the Triton twin of a `rows`-request graph whose kernel fits
    per_sm programs on an SM: the token limit cut to wave_tokens (wave_short_tokens()) where one program per request
    and KV head just overfills the SMs' first wave."""
    tokens, most = limits
    full = per_sm * num_sms
    if full < rows * num_kv_heads <= TWIN_WAVE_SLACK * full:
        tokens = min(tokens, wave_tokens)
    return tokens, most


def no_split_decode_min_batch(device: torch.device, num_kv_heads: int) -> int:
    """The decode batch size from which tensor-core graphs plan without split-KV: NANOVLLM_NO_SPLIT_DECODE_MIN_BATCH
    (A/B knob, read when a graph is built; 0 = always split), by default where FlashInfer's graph-mode planner can
    no longer split (2 x SMs / KV heads, see above)."""
    value = os.environ.get("NANOVLLM_NO_SPLIT_DECODE_MIN_BATCH")
    if value is not None:
        return int(value)
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count // num_kv_heads


def cascade_own_kernel() -> str:
    """NANOVLLM_CASCADE_OWN_KERNEL: the kernel of cascade graphs' own-pages level: "triton" (the split-KV Triton
    kernel) or "flashinfer" (its decode kernel, A/B runs)."""
    return env_choice("NANOVLLM_CASCADE_OWN_KERNEL", "triton", ("triton", "flashinfer"))


SHARED_SPLITS = 16  # KV chunks the shared cascade level is split into, so its single query group fills the SMs


class PagedIndices:
    """FlashInfer's page-table triple (indptr, indices, last_page_len) built on the host from block tables."""

    @staticmethod
    def write(tables: list[list[int]], kv_lens: list[int], block_size: int, first_block: int, indptr: np.ndarray):
        """Fill indptr[: rows + 1] (indptr[0] stays 0) for pages first_block.. of each table holding kv_lens tokens;
        returns (kv lengths, pages per row, the flat page indices)."""
        # numpy and one flat pass: at 256 requests this runs every step, and list-to-tensor conversion was 3x slower.
        kv = np.asarray(kv_lens, dtype=np.int64)
        pages = -(-kv // block_size)
        np.cumsum(pages - first_block, out=indptr[1 : len(kv_lens) + 1])
        flat = itertools.chain.from_iterable(t[first_block:p] for t, p in zip(tables, pages.tolist()))
        return kv, pages, np.fromiter(flat, dtype=np.int32, count=int(indptr[len(kv_lens)]))

    @staticmethod
    def build(tables: list[list[int]], kv_lens: list[int], block_size: int, first_block: int = 0):
        """Pages first_block.. of each table that hold kv_lens tokens, as int32 CPU tensors."""
        indptr = np.zeros(len(kv_lens) + 1, dtype=np.int32)
        kv, pages, indices = PagedIndices.write(tables, kv_lens, block_size, first_block, indptr)
        last = (kv - (pages - 1) * block_size).astype(np.int32)
        return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


class StagedTables:
    """Page tables of a fixed-buffer graph step, written straight into one pinned host buffer that plan() and the
    copies read: no tensor conversions and no staging allocation per step.

    Why: planning the prefix-cache benchmark's warm step took ~0.72 ms of host time in the request (H100 host,
    docs/benchmarks.md), of which building the tables and copying them through a fresh pinned buffer took ~0.3 ms,
    and FlashInfer's plan() copies from pageable tensors synchronously. The buffer is rewritten only after the step
    that read it has consumed its inputs (ModelRunner.launch waits for that)."""

    def __init__(self, rows: int, max_pages: int, device: torch.device):
        pin = device.type == "cuda"
        n = rows + 1
        self.buf = torch.zeros(2 * n + 2 * rows + max_pages, dtype=torch.int32, pin_memory=pin)
        views = self.buf.split([n, n, rows, rows, max_pages])
        self.qo_indptr, self.indptr, self.last, self.seq_lens, self.indices = views
        self.np = [v.numpy() for v in views]

    def fill(self, tables: list[list[int]], kv_lens: list[int], block_size: int, first_block: int = 0) -> int:
        """Pages first_block.. of each table holding kv_lens tokens (as PagedIndices.build); returns the row count."""
        _, indptr, last, seq, indices = self.np
        rows = len(tables)
        kv, pages, flat = PagedIndices.write(tables, kv_lens, block_size, first_block, indptr)
        indices[: flat.shape[0]] = flat
        last[:rows] = kv - (pages - 1) * block_size
        seq[:rows] = kv - first_block * block_size
        return rows

    def total(self, rows: int) -> int:
        """Page indices the last fill wrote for its rows."""
        return int(self.np[1][rows])

    def fill_qo(self, q_lens: list[int]) -> None:
        """The query-token offsets of each row (prefill steps)."""
        np.cumsum(q_lens, out=self.np[0][1 : len(q_lens) + 1])

    def shape_key(self, rows: int) -> bytes:
        """Everything of the last fill that a plan() depends on (query offsets, pages per row, lengths): not the
        page ids themselves, which plan() only copies."""
        qo, indptr, last, seq, _ = self.np
        return b"".join(a.tobytes() for a in (qo[: rows + 1], indptr[: rows + 1], last[:rows], seq[:rows]))

    def send_indices(self, rows: int, dst: torch.Tensor) -> torch.Tensor:
        """Copy the rows' page indices into the device buffer dst (enqueued, not awaited); returns the part written.

        dst is the wrapper's own page-index buffer: plan() then finds its indices already in place (torch skips a
        copy onto the same memory), where from a host tensor it would copy synchronously and from another device
        tensor it would launch one more copy (each CUDA call costs several times more right after idle)."""
        total = self.total(rows)
        on_device = dst[:total]
        on_device.copy_(self.indices[:total], non_blocking=True)
        return on_device


def eager_prefill_backend() -> str:
    """NANOVLLM_PREFILL_BACKEND: FlashInfer's kernel family for eager prefill steps: "auto" (FlashInfer's choice, fa3
    on sm90, except fa2 for steps of short requests; see packed_prefill_pays), "fa2" or "fa3" for every such step
    (A/B runs)."""
    return env_choice("NANOVLLM_PREFILL_BACKEND", "auto", ("auto", "fa2", "fa3"))


def packed_prefill_pays(q_lens: list[int], head_dim: int) -> bool:
    """Whether an eager prefill step runs FlashInfer's fa2 kernel rather than fa3 (sm90): when no request's query
    tokens fill more than half of one of fa3's query tiles.

    Why: fa3 gives each query head its own tiles of 128 query rows (192 at head_dim 64), so requests of a few dozen
    new tokens over a long context (many questions on one document) leave most of each tile idle, while fa2 packs
    a KV head's query heads into one tile. Measured on an H100 (docs/benchmarks.md, gpu_profile.py
    prefillbackend): 64 requests of 64 tokens over 4,160 cached, fa2 1.22-1.32x faster; fuller tiles (120-4,096
    tokens per request) fa3 1.2-2.6x faster."""
    tile = 192 if head_dim == 64 else 128
    # The longest request decides: a long chunk in the step (a prompt, with decode rows beside it) keeps fa3.
    return 2 * max(q_lens) <= tile


class _FlashInferAttention(AttentionBackend):
    """Shared shape facts and the per-layer KV append; subclasses set the page tables and how to attend."""

    name = "flashinfer"

    def __init__(self, runner, block_size: int, workspace: torch.Tensor | None):
        import flashinfer

        self.flashinfer = flashinfer
        self.device = runner.device
        self.dtype = runner.dtype
        self.num_heads = runner.num_heads
        self.num_kv_heads = runner.num_kv_heads
        self.head_dim = runner.head_dim
        self.block_size = block_size
        self.workspace = (
            workspace if workspace is not None else torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        )
        # Set by plan(): where this step's K/V go (token -> request row, position in that row's pages).
        self.batch_indices = self.positions = None
        self.kv_indptr = self.kv_indices = self.kv_last = None
        # q/k norm + rope + K/V append in one Triton kernel (engine/layers/fused_qkv.py) instead of four launches.
        self.fused_qkv = fused_qkv_available(self.head_dim)

    def _common(self) -> dict:
        # Every plan() defaults to float16: say what the tensors really are.
        return dict(
            num_qo_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            page_size=self.block_size,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def _prefill_wrapper(self, graph_backend: str = "fa2", **graph_buffers):
        if graph_buffers:
            return self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "HND", use_cuda_graph=True, backend=graph_backend, **graph_buffers
            )
        return self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "HND", backend=eager_prefill_backend()
        )

    def _decode_wrapper(self, indptr=None, indices=None, last=None, rows: int = 1):
        # CUDA cores below TENSOR_CORE_DECODE_MIN_BATCH, tensor cores from there (see the constant).
        tensor_cores = rows >= TENSOR_CORE_DECODE_MIN_BATCH
        graph = {}
        if indptr is not None:
            graph = dict(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=indptr,
                paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last,
            )
        return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "HND", use_tensor_cores=tensor_cores, backend="fa2", **graph
        )

    def attend(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Attention of q over the planned pages (after this step's K/V were appended)."""
        raise NotImplementedError

    def forward_qkv(self, qkv, attn, rope_positions, kv_cache):
        """From the packed QKV projection: norm and rotate q/k, append K/V (one fused kernel), then attend."""
        q = qk_norm_rope_append(
            qkv,
            self.num_heads,
            self.num_kv_heads,
            *attn.qk_norm_args(),
            attn.rotary.cos_sin_cache,
            rope_positions,
            self.batch_indices,
            self.positions,
            self.kv_indptr,
            self.kv_indices,
            kv_cache,
        )
        return self.attend(q, kv_cache)

    def forward(self, layer_id, q, k, v, kv_cache):
        """Append this step's K/V to the pages, then attend."""
        self.flashinfer.page.append_paged_kv_cache(
            k,
            v,
            self.batch_indices,
            self.positions,
            kv_cache,
            self.kv_indices,
            self.kv_indptr,
            self.kv_last,
            kv_layout="HND",
        )
        return self.attend(q.contiguous(), kv_cache)


class FlashInferBackend(_FlashInferAttention):
    """Eager steps of any shape: plans once per step and runs FlashInfer's paged kernels in every layer."""

    def __init__(self, runner, config, workspace: torch.Tensor | None = None):
        super().__init__(runner, config.block_size, workspace)
        self.prefill = self._prefill_wrapper()
        # fa2 for steps whose fa3 tiles would be mostly idle (packed_prefill_pays); it shares the workspace, as only
        # one wrapper is planned per step.
        self.packed_prefill = None
        if eager_prefill_backend() == "auto":
            self.packed_prefill = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "HND", backend="fa2"
            )
        self.planned_prefill = self.prefill
        self.prefill_steps = {"auto": 0, "fa2": 0}  # eager prefill steps per wrapper (tests, benchmarks)
        self.decode = self._decode_wrapper()
        # Cascade, written out rather than through MultiLevelCascadeAttentionWrapper: the shared level is one
        # "request" with all queries, so it needs split-KV (fixed_split_size) to fill the GPU; the unique
        # level is plain decode. Their partial states merge with merge_state_in_place.
        self.shared_prefill = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND", backend="fa2")
        self.unique_decode = self._decode_wrapper()
        self.mode = "prefill"

    def plan(self, meta: AttentionMetadata) -> None:
        """Build page tables for the step and plan the wrapper that will run it."""
        bs = self.block_size
        indptr, indices, last = PagedIndices.build(meta.block_tables_cpu, meta.kv_lens_cpu, bs)
        # The planners read indptr and last on the host; the indices only go to the device, so they get ours.
        self.kv_indptr, self.kv_indices, self.kv_last = to_device([indptr, indices, last], self.device)
        self.batch_indices = meta.req_index.to(torch.int32)
        self.positions = meta.positions.to(torch.int32)
        common = self._common()
        if meta.shared_prefix_blocks:
            shared = meta.shared_prefix_blocks
            n = meta.num_reqs
            s_indices = torch.tensor(meta.block_tables_cpu[0][:shared], dtype=torch.int32)
            u_indptr, u_indices, u_last = PagedIndices.build(meta.block_tables_cpu, meta.kv_lens_cpu, bs, shared)
            s_indices, u_indices = to_device([s_indices, u_indices], self.device)
            self.shared_prefill.plan(
                torch.tensor([0, n], dtype=torch.int32),
                torch.tensor([0, shared], dtype=torch.int32),
                s_indices,
                torch.tensor([bs], dtype=torch.int32),
                head_dim_qk=self.head_dim,
                causal=False,
                fixed_split_size=max(1, shared // SHARED_SPLITS),
                **common,
            )
            self.unique_decode.plan(u_indptr, u_indices, u_last, head_dim=self.head_dim, **common)
            self.mode = "cascade"
        elif meta.is_decode:
            indptr, last = pin_host([indptr, last], self.device)
            self.decode.plan(indptr, self.kv_indices, last, head_dim=self.head_dim, **common)
            self.mode = "decode"
        else:
            # Pinned offsets and lengths, the lengths and maxima given: plan() then computes none of them on the
            # host and queues its copies without waiting for the step still running.
            kv_lens = torch.tensor(meta.kv_lens_cpu, dtype=torch.int32)
            qo, indptr, last, kv_lens = pin_host([meta.cu_seqlens_q_cpu, indptr, last, kv_lens], self.device)
            packed = self.packed_prefill is not None and packed_prefill_pays(meta.q_lens_cpu, self.head_dim)
            self.planned_prefill = self.packed_prefill if packed else self.prefill
            self.prefill_steps["fa2" if packed else "auto"] += 1
            self.planned_prefill.plan(
                qo, indptr, self.kv_indices, last, head_dim_qk=self.head_dim, causal=True, seq_lens=kv_lens,
                max_token_per_sequence=max(meta.q_lens_cpu), max_sequence_kv=max(meta.kv_lens_cpu), **common,
            )  # fmt: skip
            self.mode = "prefill"

    def attend(self, q, kv_cache):
        """Decode, cascade or prefill attention, as planned."""
        if self.mode == "decode":
            return self.decode.run(q, kv_cache)
        if self.mode == "cascade":
            return _cascade(self.flashinfer, self.unique_decode, self.shared_prefill, q, kv_cache)
        return _prefill_run(self.planned_prefill, q, kv_cache)


def _prefill_run(wrapper, q: torch.Tensor, kv_cache: torch.Tensor, **kwargs):
    # FlashInfer's paged prefill run() zero-fills the output it allocates (one fill kernel per layer: 28 per step,
    # a 16 MB fill per layer for a 4,096-token prompt). Every query row is written by the kernel or its merge, so an
    # uninitialised buffer serves.
    return wrapper.run(q, kv_cache, out=torch.empty_like(q), **kwargs)


def _cascade(flashinfer, unique_decode, shared_prefill, q, kv_cache):
    # Each request's own pages, then the shared prefix read once for all queries; merge the two softmax states.
    out, lse = unique_decode.run(q, kv_cache, return_lse=True)
    return _merge_shared(flashinfer, shared_prefill, out, lse, q, kv_cache)


def _merge_shared(flashinfer, shared_prefill, out, lse, q, kv_cache):
    # The shared level for q, merged into the own level's state (out, base-2 lse) in place.
    out_shared, lse_shared = _prefill_run(shared_prefill, q, kv_cache, return_lse=True)
    flashinfer.merge_state_in_place(out, lse, out_shared, lse_shared)
    return out


class GraphAttention(_FlashInferAttention):
    """Fixed-address page tables for `rows` requests and `tokens` query tokens, so a CUDA graph can capture the
    step; plan() refills the buffers outside the graph. Padding rows point at the scratch (dummy) block."""

    fused_decode = False  # GraphDecodeAttention: attention that also does the q/k norm, rope and append

    def __init__(self, runner, block_size: int, workspace, rows: int, tokens: int, max_pages_per_row: int):
        super().__init__(runner, block_size, workspace)
        self.rows, self.tokens = rows, tokens
        dev = self.device
        self.kv_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(rows * max_pages_per_row + tokens, dtype=torch.int32, device=dev)
        self.kv_last = torch.ones(rows, dtype=torch.int32, device=dev)
        # Filled inside the graph from the runner's int64 inputs (one H2D copy per step for everything).
        self.batch_indices = torch.zeros(tokens, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(tokens, dtype=torch.int32, device=dev)
        self.staged = StagedTables(rows, self.kv_indices.numel(), dev)

    def pad_tables(self, tables: list[list[int]], kv_lens: list[int], dummy_block: int):
        """Tables and lengths padded to `rows` rows: each padding row is one token in the dummy block."""
        pad = self.rows - len(tables)
        return tables + [[dummy_block]] * pad, kv_lens + [1] * pad


class GraphDecodeAttention(GraphAttention):
    """Decode for one captured batch size."""

    triton_attention = True  # small batches may attend with the split-KV Triton kernel (see __init__)

    def __init__(
        self, runner, block_size, workspace, rows, max_pages_per_row, whole_kv: bool | None = None, skewed=None
    ):
        """whole_kv: plan each request's KV as one chunk (True) or split it (False), tensor-core sizes only; None
        decides by the batch size (no_split_decode_min_batch). skewed: (splits, split_buffers(), mean_chunk) to attend
        with the Triton split-KV kernel at this size (the twin for steps with one dominant context or short ones)."""
        super().__init__(runner, block_size, workspace, rows, rows, max_pages_per_row)
        self.batch_indices.copy_(torch.arange(rows, dtype=torch.int32))
        self.decode = self._decode_wrapper(self.kv_indptr, self.kv_indices, self.kv_last, rows)
        if whole_kv is None:
            whole_kv = 0 < no_split_decode_min_batch(self.device, self.num_kv_heads) <= rows
        self.whole_kv = whole_kv and rows >= TENSOR_CORE_DECODE_MIN_BATCH and skewed is None
        self.split_args = {"disable_split_kv": True} if self.whole_kv else {}
        # The smallest batches attend with one Triton kernel (split-KV with the merge inside) instead of FlashInfer's
        # decode + merge kernels (triton_decode.py); plan_rows() then fills its page-table buffers without planning.
        self.split_decode = None
        small = rows <= triton_decode_max_rows() or skewed is not None
        if self.triton_attention and small and triton_decode_supported(self.head_dim, block_size, self.device):
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            splits, buffers, mean_chunk = skewed or (None, None, False)
            self.split_decode = SplitDecode(
                rows, self.num_heads, self.num_kv_heads, self.head_dim, self.device, sms, splits, buffers, mean_chunk
            )
        # With it, the q/k norm + rope + K/V append happen inside the attention kernel too (one launch fewer per
        # layer); it then reads the step's int64 last-page lengths itself (last_len, set by the graph runner).
        self.fused_decode = self.split_decode is not None and self.fused_qkv and fused_decode_enabled()
        self.last_len: torch.Tensor | None = None

    def plan_rows(self, tables, kv_lens, dummy_block: int) -> None:
        """Plan the given requests plus padding rows."""
        tables, kv_lens = self.pad_tables(tables, kv_lens, dummy_block)
        st = self.staged
        rows = st.fill(tables, kv_lens, self.block_size)
        if self.split_decode is not None:
            # The Triton kernel reads only the page table: FlashInfer's plan (a split schedule for its own decode
            # kernel, computed on the host) would go unused, so the buffers are filled directly.
            self.kv_indptr.copy_(st.indptr, non_blocking=True)
            st.send_indices(rows, self.kv_indices)
            self.kv_last.copy_(st.last, non_blocking=True)
            return
        indices = st.send_indices(rows, self.kv_indices)
        self.decode.plan(
            st.indptr, indices, st.last, head_dim=self.head_dim, **self._common(), **self.split_args
        )  # fmt: skip

    def forward_qkv(self, qkv, attn, rope_positions, kv_cache):
        """From the packed QKV projection: the fused decode kernel where it serves, else as the base class."""
        if not self.fused_decode:
            return super().forward_qkv(qkv, attn, rope_positions, kv_cache)
        return self._fused(qkv, attn, rope_positions, kv_cache)

    def _fused(self, qkv, attn, rope_positions, kv_cache, states: bool = False):
        return self.split_decode.fused(
            qkv,
            *attn.qk_norm_args(),
            attn.rotary.cos_sin_cache,
            rope_positions,
            kv_cache,
            self.kv_indptr,
            self.kv_indices,
            self.last_len,
            states=states,
        )

    def attend(self, q, kv_cache):
        """Paged decode attention."""
        if self.split_decode is not None:
            return self.split_decode(q, kv_cache, self.kv_indptr, self.kv_indices, self.kv_last)
        return self.decode.run(q, kv_cache)


class GraphCascadeAttention(GraphDecodeAttention):
    """Cascade decode for one captured batch size: the inherited page tables hold each request's own blocks
    (after the shared ones; the append positions are relative to them), a one-request non-causal prefill
    over the shared blocks serves every query, and the two states merge."""

    triton_attention = False  # the small-batch rule of the base class does not apply; see cascade_own_kernel()

    def __init__(self, runner, block_size, workspace, rows, max_pages_per_row):
        super().__init__(runner, block_size, workspace, rows, max_pages_per_row)
        dev = self.device
        if cascade_own_kernel() == "triton" and triton_decode_supported(self.head_dim, block_size, dev):
            # Each request's own pages by the split-KV Triton kernel, which also returns the state the merge takes;
            # plan_rows() then fills its page tables without FlashInfer's planner.
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            self.split_decode = SplitDecode(rows, self.num_heads, self.num_kv_heads, self.head_dim, dev, sms)
            # It can also take the q/k norm, rope and K/V append (one launch fewer per layer), handing the rotated q
            # to the shared level.
            self.fused_decode = self.fused_qkv and fused_decode_enabled()
        self.s_qo_indptr = torch.tensor([0, rows], dtype=torch.int32, device=dev)
        self.s_indptr = torch.zeros(2, dtype=torch.int32, device=dev)
        self.s_indices = torch.zeros(max_pages_per_row, dtype=torch.int32, device=dev)
        self.s_last = torch.ones(1, dtype=torch.int32, device=dev)
        self.shared = self._prefill_wrapper(
            qo_indptr_buf=self.s_qo_indptr,
            paged_kv_indptr_buf=self.s_indptr,
            paged_kv_indices_buf=self.s_indices,
            paged_kv_last_page_len_buf=self.s_last,
        )

    def plan_cascade(self, tables, kv_lens, shared_blocks: int, dummy_block: int) -> None:
        """Plan the shared level over tables[0][:shared_blocks] and each row's remaining blocks."""
        bs = self.block_size
        own = [t[shared_blocks:] for t in tables]
        own_lens = [n - shared_blocks * bs for n in kv_lens]
        self.plan_rows(own, own_lens, dummy_block)
        shared_pages = max(shared_blocks, 1)
        pages = tables[0][:shared_blocks] if shared_blocks else [dummy_block]
        last = bs if shared_blocks else 1
        # Split-KV is left to FlashInfer's CUDA-graph planner: it sizes chunks to the fixed grid.
        self.shared.plan(
            torch.tensor([0, self.rows], dtype=torch.int32),
            torch.tensor([0, shared_pages], dtype=torch.int32),
            *to_device([torch.tensor(pages, dtype=torch.int32)], self.device),
            torch.tensor([last], dtype=torch.int32),
            head_dim_qk=self.head_dim,
            causal=False,
            **self._common(),
        )

    def forward_qkv(self, qkv, attn, rope_positions, kv_cache):
        """From the packed QKV projection: with the fused Triton kernel, the own level (norms, rope and append
        included), then the shared level with its rotated q; else as the base class."""
        if not self.fused_decode:
            return super().forward_qkv(qkv, attn, rope_positions, kv_cache)
        out, lse, q = self._fused(qkv, attn, rope_positions, kv_cache, states=True)
        return _merge_shared(self.flashinfer, self.shared, out, lse, q, kv_cache)

    def attend(self, q, kv_cache):
        """Own pages by decode, shared pages once, merged."""
        if self.split_decode is None:
            return _cascade(self.flashinfer, self.decode, self.shared, q, kv_cache)
        out, lse = self.split_decode.with_lse(q, kv_cache, self.kv_indptr, self.kv_indices, self.kv_last)
        return _merge_shared(self.flashinfer, self.shared, out, lse, q, kv_cache)


class GraphPrefillAttention(GraphAttention):
    """Prefill or mixed steps of up to `tokens` query tokens and rows - 1 requests; the last row takes the
    padding tokens (causal over dummy pages), unused rows have no query tokens. `backend`: FlashInfer's kernel
    family ("fa2", or "auto" for fa3 on sm90, which large steps want: docs/benchmarks.md, section 4)."""

    def __init__(self, runner, block_size, workspace, rows, tokens, max_pages_per_row, backend: str = "fa2"):
        super().__init__(runner, block_size, workspace, rows, tokens, max_pages_per_row)
        self.qo_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=self.device)
        self.prefill = self._prefill_wrapper(
            backend,
            qo_indptr_buf=self.qo_indptr,
            paged_kv_indptr_buf=self.kv_indptr,
            paged_kv_indices_buf=self.kv_indices,
            paged_kv_last_page_len_buf=self.kv_last,
        )
        # StagedTables.shape_key() of this wrapper's last plan(); None forces the next one (set it to None after
        # planning the wrapper any other way).
        self.planned_shape: bytes | None = None

    def plan_step(self, q_lens: list[int], tables, kv_lens, dummy_block: int) -> bool:
        """Plan the requests' query lengths and pages, padding to the captured rows and tokens; False when the
        step repeats the shape of this graph's last plan, whose schedule then stands (only the pages are sent).

        Why: a repeated shape is the common case of a prompt over a cached prefix (the same document, a new
        question of the same length), and FlashInfer's plan() was ~170-250 us of the ~2.4 ms warm TTFT on an H100
        (docs/benchmarks.md). plan() reads only the offsets and lengths on the host; in CUDA-graph mode it copies
        them, and the schedule it computes from them, into this wrapper's own device buffers, which nothing else
        writes, so with the same inputs they already hold what it would write."""
        pad_tokens = self.tokens - sum(q_lens)
        unused = self.rows - 1 - len(q_lens)
        q_lens = q_lens + [0] * unused + [pad_tokens]
        tables = tables + [[dummy_block]] * unused + [[dummy_block] * max(1, -(-pad_tokens // self.block_size))]
        kv_lens = kv_lens + [1] * unused + [max(pad_tokens, 1)]
        st = self.staged
        rows = st.fill(tables, kv_lens, self.block_size)
        st.fill_qo(q_lens)
        # Pinned host tables (copied without waiting), the lengths and maxima given: plan() computes none of them.
        # Split-KV chunking stays with FlashInfer's graph planner: fixed chunks of 3-17 pages measured no faster at
        # 1k-8k tokens of context (gpu_profile.py prefillsplit, docs/benchmarks.md).
        indices = st.send_indices(rows, self.kv_indices)
        shape = st.shape_key(rows)
        if shape == self.planned_shape:
            return False
        self.prefill.plan(
            st.qo_indptr, st.indptr, indices, st.last, head_dim_qk=self.head_dim, causal=True,
            seq_lens=st.seq_lens, max_token_per_sequence=max(q_lens), max_sequence_kv=max(kv_lens),
            **self._common(),
        )  # fmt: skip
        self.planned_shape = shape
        return True

    def attend(self, q, kv_cache):
        """Paged causal prefill attention."""
        return _prefill_run(self.prefill, q, kv_cache)
