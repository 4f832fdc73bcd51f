"""FlashInfer attention over the engine's paged HND cache: prefill, decode, cascade, and a CUDA-graph decode mode."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata

WORKSPACE_BYTES = 256 * 1024 * 1024
SHARED_SPLITS = 16  # KV chunks the shared cascade level is split into, so its single query group fills the SMs


class PagedIndices:
    """FlashInfer's page-table triple (indptr, indices, last_page_len) built on the host from block tables."""

    @staticmethod
    def build(tables: list[list[int]], kv_lens: list[int], block_size: int, first_block: int = 0):
        """Pages first_block.. of each table that hold kv_lens tokens, as int32 CPU tensors."""
        indptr = [0]
        indices: list[int] = []
        last = []
        for table, n in zip(tables, kv_lens):
            pages = -(-n // block_size)
            indices.extend(table[first_block:pages])
            indptr.append(len(indices))
            last.append(n - (pages - 1) * block_size)
        mk = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        return mk(indptr), mk(indices), mk(last)


class FlashInferBackend(AttentionBackend):
    """Plans once per step and runs FlashInfer's paged kernels in every layer; writes K/V with one append kernel."""

    name = "flashinfer"

    def __init__(
        self,
        runner,
        config,
        graph_batch_size: int | None = None,
        workspace: torch.Tensor | None = None,
        max_pages_per_req: int = 0,
    ):
        import flashinfer

        self.flashinfer = flashinfer
        self.device = runner.device
        self.dtype = runner.dtype
        self.num_heads = runner.num_heads
        self.num_kv_heads = runner.num_kv_heads
        self.head_dim = runner.head_dim
        self.scale = runner.head_dim**-0.5
        self.block_size = config.block_size
        self.workspace = (
            workspace if workspace is not None else torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        )
        self.graph_batch_size = graph_batch_size
        if graph_batch_size is None:
            self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND")
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "HND", use_tensor_cores=False, backend="fa2"
            )
            # Cascade, written out rather than through MultiLevelCascadeAttentionWrapper: the shared level is one
            # "request" with all queries, so it needs split-KV (fixed_split_size) to fill the GPU; the unique
            # level is plain decode. Their partial states merge with merge_state_in_place.
            self.shared_prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "HND", backend="fa2")
            self.unique_decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "HND", use_tensor_cores=False, backend="fa2"
            )
        else:
            # Fixed buffers: the graph reads these addresses; plan() rewrites their contents each step.
            bs = graph_batch_size
            max_pages = bs * (max_pages_per_req + 1)
            self.indptr_buf = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
            self.indices_buf = torch.zeros(max_pages, dtype=torch.int32, device=self.device)
            self.last_buf = torch.ones(bs, dtype=torch.int32, device=self.device)
            self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "HND",
                use_cuda_graph=True,
                use_tensor_cores=False,
                paged_kv_indptr_buffer=self.indptr_buf,
                paged_kv_indices_buffer=self.indices_buf,
                paged_kv_last_page_len_buffer=self.last_buf,
                backend="fa2",
            )
            self.batch_indices_buf = torch.arange(bs, dtype=torch.int32, device=self.device)
            self.positions_buf = torch.zeros(bs, dtype=torch.int32, device=self.device)
        self.mode = "prefill"

    def _types(self) -> dict:
        # Every plan() defaults to float16: say what the tensors really are.
        return {"q_data_type": self.dtype, "kv_data_type": self.dtype}

    def plan(self, meta: AttentionMetadata) -> None:
        """Build page tables for the step and plan the wrapper that will run it."""
        if self.graph_batch_size is not None:
            raise RuntimeError("a graph backend is planned through plan_graph_rows()")
        bs = self.block_size
        indptr, indices, last = PagedIndices.build(meta.block_tables_cpu, meta.kv_lens_cpu, bs)
        dev = self.device
        self.kv_indptr = indptr.to(dev, non_blocking=True)
        self.kv_indices = indices.to(dev, non_blocking=True)
        self.kv_last = last.to(dev, non_blocking=True)
        self.batch_indices = meta.req_index.to(torch.int32)
        self.positions = meta.positions.to(torch.int32)
        common = dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads, page_size=bs, **self._types())
        if meta.shared_prefix_blocks:
            shared = meta.shared_prefix_blocks
            n = meta.num_reqs
            s_indices = torch.tensor(meta.block_tables_cpu[0][:shared], dtype=torch.int32)
            u_indptr, u_indices, u_last = PagedIndices.build(meta.block_tables_cpu, meta.kv_lens_cpu, bs, shared)
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
            self.decode.plan(indptr, indices, last, head_dim=self.head_dim, **common)
            self.mode = "decode"
        else:
            self.prefill.plan(
                meta.cu_seqlens_q.cpu(), indptr, indices, last, head_dim_qk=self.head_dim, causal=True, **common
            )
            self.mode = "prefill"

    def plan_graph_rows(self, tables: list[list[int]], kv_lens: list[int], dummy_block: int) -> None:
        """Plan graph_batch_size rows: the given requests, then padding rows that write into the dummy block."""
        pad = self.graph_batch_size - len(tables)
        tables = tables + [[dummy_block]] * pad
        kv_lens = kv_lens + [1] * pad
        indptr, indices, last = PagedIndices.build(tables, kv_lens, self.block_size)
        self.decode.plan(
            indptr,
            indices,
            last,
            num_qo_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            page_size=self.block_size,
            **self._types(),
        )
        self.kv_indptr, self.kv_indices, self.kv_last = self.indptr_buf, self.indices_buf, self.last_buf
        self.batch_indices = self.batch_indices_buf
        self.positions = self.positions_buf
        self.mode = "decode"

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
        if self.mode == "decode":
            return self.decode.run(q.contiguous(), kv_cache)
        if self.mode == "cascade":
            q = q.contiguous()
            out, lse = self.unique_decode.run(q, kv_cache, return_lse=True)
            out_shared, lse_shared = self.shared_prefill.run(q, kv_cache, return_lse=True)
            self.flashinfer.merge_state_in_place(out, lse, out_shared, lse_shared)
            return out
        return self.prefill.run(q.contiguous(), kv_cache)
