"""CUDA graphs for decode steps: one graph per batch size, FlashInfer decode wrappers with fixed buffers."""

from __future__ import annotations

import logging
import time

import torch

from engine.attention.flashinfer_backend import FlashInferBackend
from engine.models.llama import ForwardContext

logger = logging.getLogger("engine")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes 1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphRunner:
    """Captures the model's decode forward per batch size and replays it with the step's inputs copied in."""

    def __init__(self, runner, config, max_model_len: int):
        self.runner = runner
        self.sizes = capture_sizes(config.max_num_seqs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        # Rows: token ids, positions, last-page lengths. Filled on the host (pinned), sent in one copy per step.
        self.static = torch.zeros(3, self.max_bs, dtype=torch.long, device=dev)
        self.host = torch.zeros(3, self.max_bs, dtype=torch.long).pin_memory()
        self.host_np = self.host.numpy()
        self.static[2].fill_(1)  # capture runs on padding rows: one valid entry each
        self.input_ids, self.positions = self.static[0], self.static[1]
        pages = -(-max_model_len // config.block_size)
        workspace = runner.backend.workspace
        self.backends = {
            bs: FlashInferBackend(runner, config, graph_batch_size=bs, workspace=workspace, max_pages_per_req=pages)
            for bs in self.sizes
        }
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # size -> (graph, logits)
        self.planned: dict[int, tuple] = {}  # size -> page layout of the last plan()
        self.num_plans = 0
        self.pool_bytes = 0

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per size, largest first so smaller ones reuse its memory pool."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.runner.device)
        pool = None
        model = self.runner.model
        for bs in reversed(self.sizes):
            backend = self.backends[bs]
            backend.plan_graph_rows([], [], self.runner.dummy_block)  # all padding rows
            ctx = ForwardContext(self.positions[:bs], backend, self.runner.kv_cache)
            self._forward(model, backend, ctx, bs)  # warm-up outside the graph (lazy inits, autotuning)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(model, backend, ctx, bs)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        self.pool_bytes = torch.cuda.memory_reserved(self.runner.device) - before
        logger.info(
            "captured %d decode CUDA graphs (batch %s) in %.1fs, %.0f MiB",
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - start,
            self.pool_bytes / 2**20,
        )

    def _forward(self, model, backend, ctx, bs: int) -> torch.Tensor:
        # Inside the graph: the KV-append positions and last-page lengths (int32), and the lm_head, so a step is one
        # replay and steps that add no page need no plan().
        backend.positions_buf[:bs].copy_(self.positions[:bs])
        backend.last_buf[:bs].copy_(self.static[2, :bs])
        return model.compute_logits(model(self.input_ids[:bs], ctx))

    def fits(self, num_reqs: int) -> bool:
        """Whether a decode batch of this many requests has a captured graph."""
        return num_reqs <= self.max_bs

    def decode(self, reqs: list) -> torch.Tensor:
        """Logits [n, vocab] for one decode step of reqs, by graph replay; no per-step tensor building."""
        n = len(reqs)
        bs = next(s for s in self.sizes if s >= n)
        h = self.host_np
        block_size = self.runner.block_size
        h[0, :n] = [r.all_token_ids[-1] for r in reqs]
        h[1, :n] = positions = [r.num_tokens - 1 for r in reqs]
        h[2, :n] = [p % block_size + 1 for p in positions]
        h[:2, n:bs] = 0  # padded rows: token 0 at position 0 of the dummy block (one entry)
        h[2, n:bs] = 1
        self.static[:, :bs].copy_(self.host[:, :bs], non_blocking=True)
        backend = self.backends[bs]
        # FlashInfer's decode plan depends on the page lists, not on how full the last page is: re-plan only
        # when a request gains a page or the batch changes (every block_size steps at batch 1).
        layout = tuple((r.block_table[0], len(r.block_table), p // block_size) for r, p in zip(reqs, positions))
        if self.planned.get(bs) != layout:
            tables = [r.block_table for r in reqs]
            backend.plan_graph_rows(tables, [r.num_tokens for r in reqs], self.runner.dummy_block)
            self.planned[bs] = layout
            self.num_plans += 1
        graph, logits = self.graphs[bs]
        graph.replay()
        return logits[:n]
