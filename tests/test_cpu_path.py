"""The CPU path: linear layers run on oneDNN-packed weights, and the memory report still counts every weight."""

from __future__ import annotations

import torch


def test_linears_run_on_packed_weights_and_memory_counts_them(qwen3_llm, qwen3_path):
    from transformers import AutoModelForCausalLM

    from engine.layers.linear import Linear

    assert torch.backends.mkldnn.is_available()
    model = qwen3_llm.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    # Every linear serves from its packed copy; the dense one is freed rather than kept twice.
    assert linears and all(m.onednn_weight is not None and m.weight.numel() == 0 for m in linears)
    hf = AutoModelForCausalLM.from_pretrained(qwen3_path)
    tied_head_copy = model.embed_tokens.weight.numel() if model.lm_head is None else 0
    expected = (sum(p.numel() for p in hf.parameters()) + tied_head_copy) * 4  # fp32
    assert qwen3_llm.memory()["weights_bytes"] == expected
