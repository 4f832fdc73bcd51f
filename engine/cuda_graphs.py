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
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.long, device=dev)
        pages = -(-max_model_len // config.block_size)
        workspace = runner.backend.workspace
        self.backends = {
            bs: FlashInferBackend(runner, config, graph_batch_size=bs, workspace=workspace, max_pages_per_req=pages)
            for bs in self.sizes
        }
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
            backend.plan_graph(None, 0, self.runner.dummy_block)
            ctx = ForwardContext(self.positions[:bs], backend, self.runner.kv_cache)
            model(self.input_ids[:bs], ctx)  # warm-up outside the graph (lazy inits, autotuning)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = model(self.input_ids[:bs], ctx)
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

    def can_run(self, meta) -> bool:
        """Decode-only steps without cascade that fit the largest captured size."""
        return meta.is_decode and meta.num_reqs <= self.max_bs and not meta.shared_prefix_blocks

    def run(self, input_ids: torch.Tensor, meta) -> torch.Tensor:
        """Copy the step in, plan the wrapper outside the graph, replay, return the real rows."""
        n = meta.num_reqs
        bs = next(s for s in self.sizes if s >= n)
        backend = self.backends[bs]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(meta.positions)
        # Padded rows: token 0 at position 0 of the dummy block; their writes and outputs are discarded.
        self.input_ids[n:bs].zero_()
        self.positions[n:bs].zero_()
        backend.positions_buf[:bs].copy_(self.positions[:bs])
        backend.plan_graph(meta, n, self.runner.dummy_block)
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:n]
