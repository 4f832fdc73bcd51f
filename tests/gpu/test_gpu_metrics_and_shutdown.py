"""On CUDA: memory report, GPU gauges in the scrape, and shutdown returning GPU memory."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from helpers import save_tiny_model, tiny_tokenizer  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402


def test_gpu_gauges_memory_report_and_shutdown(tmp_path):
    from prometheus_client import REGISTRY

    from langchain_nanovllm import attach_metrics

    # head_dim 64: a size FlashInfer's prebuilt kernels serve.
    folder = save_tiny_model("qwen3", tmp_path / "m", tokenizer_from=tiny_tokenizer(), hidden_size=256, head_dim=64)

    base = torch.cuda.memory_allocated()
    llm = LLM(folder, num_kvcache_blocks=256, max_num_seqs=8, max_model_len=512)
    assert llm.attention_backend == "flashinfer"
    label = attach_metrics(llm)
    outs = llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
    mem = llm.memory()
    assert mem["kv_cache_bytes"] == llm.runner.kv_cache_storage.nbytes > 0
    assert 0 < mem["weights_bytes"] < mem["gpu_memory_used_bytes"] <= mem["gpu_memory_reserved_bytes"]
    assert mem["gpu_memory_total_bytes"] > mem["gpu_memory_reserved_bytes"]
    for name in ("gpu_memory_used_bytes", "gpu_memory_reserved_bytes", "gpu_memory_total_bytes"):
        assert REGISTRY.get_sample_value(f"nanovllm_{name}", {"model_name": label}) > 0, name
    assert REGISTRY.get_sample_value("nanovllm_generation_tokens_total", {"model_name": label}) == 32
    # Capturing the decode and prefill graphs takes well over 10 ms: a mark in the wrong place would show ~0 here.
    graphs_s = llm.startup_seconds["cuda_graphs"]
    assert graphs_s > 0.01 and len(llm.runner.graphs.graphs) > 0
    exported = REGISTRY.get_sample_value("nanovllm_startup_seconds", {"model_name": label, "phase": "cuda_graphs"})
    assert exported == graphs_s
    used = torch.cuda.memory_allocated()
    big = mem["weights_bytes"] + mem["kv_cache_bytes"] + llm.runner.backend.workspace.nbytes
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    freed = used - torch.cuda.memory_allocated()
    # Weights, KV cache, attention workspace and graph pools go back; FlashInfer keeps small per-module caches.
    assert freed >= big, f"only {freed} bytes returned of {used - base} (weights + KV + workspace: {big})"
    again = LLM(folder, num_kvcache_blocks=64, max_num_seqs=4, max_model_len=512)
    try:
        assert len(again.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    finally:
        again.shutdown()
