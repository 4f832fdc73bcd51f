"""Greedy output matches HF transformers token for token (CPU, fp32) in every scheduling regime."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams

NEW_TOKENS = 32
LENGTHS = [3, 9, 16, 17, 31, 48, 65, 100]


def make_prompts(seed: int, shared_prefix: int = 0) -> list[list[int]]:
    """Eight prompts of different lengths drawn from the vocabulary, optionally sharing a prefix."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(4, 375, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(4, 375, (n,), generator=g).tolist() for n in LENGTHS]


_reference_cache: dict = {}


def hf_greedy(path, prompts: list[list[int]]) -> list[list[int]]:
    """HF generate(), one prompt at a time, greedy, no EOS stop."""
    from transformers import AutoModelForCausalLM

    key = (str(path), tuple(map(tuple, prompts)))
    if key not in _reference_cache:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        outs = []
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            outs.append(ids[0, len(p) :].tolist())
        _reference_cache[key] = outs
    return _reference_cache[key]


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_batch_of_eight_matches_hf(tiny_models, arch):
    prompts = make_prompts(1)
    llm = LLM(tiny_models[arch], device="cpu")
    try:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == hf_greedy(tiny_models[arch], prompts)
        assert all(o.finish_reason == "length" for o in outs)
        assert llm.stats()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_prefix_cache_hits_keep_outputs_identical(tiny_models, arch):
    prompts = make_prompts(2, shared_prefix=40)
    llm = LLM(tiny_models[arch], device="cpu")
    try:
        first = llm.generate(prompts, GREEDY)
        second = llm.generate(prompts, GREEDY)
        ref = hf_greedy(tiny_models[arch], prompts)
        assert [o.token_ids for o in first] == ref
        assert [o.token_ids for o in second] == ref
        # Repeated prompts come from the cache (all full blocks except the one holding the last token).
        assert all(o.num_cached_tokens == ((len(p) - 1) // 16) * 16 for o, p in zip(second, prompts))
        assert sum(o.num_cached_tokens for o in second) > 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_chunked_prefill_matches_hf(tiny_models, arch):
    prompts = make_prompts(3)
    llm = LLM(tiny_models[arch], device="cpu", max_num_batched_tokens=16)
    try:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == hf_greedy(tiny_models[arch], prompts)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_preemption_under_kv_pressure_matches_hf(tiny_models, arch):
    prompts = make_prompts(4)
    # 12 blocks of 16 tokens cannot hold eight requests at once: some must be preempted and recomputed.
    llm = LLM(tiny_models[arch], device="cpu", num_kvcache_blocks=12, enable_prefix_caching=False)
    try:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == hf_greedy(tiny_models[arch], prompts)
        assert llm.stats()["num_preemptions"] > 0
        assert llm.stats()["kv_blocks_used"] == 0
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    "arch,biases", [("llama", dict(attention_bias=True, mlp_bias=True)), ("qwen3", dict(attention_bias=True))]
)
def test_biased_o_and_mlp_projections_match_hf(tmp_path, tokenizer, arch, biases):
    """Checkpoints with attention_bias (a bias on q, k, v and o_proj) and Llama's mlp_bias (on gate, up and down)
    load and decode as HF does; before, loading stopped at the first o_proj or MLP bias with a TypeError."""
    from helpers import save_tiny_model

    path = save_tiny_model(arch, tmp_path / arch, tokenizer_from=tokenizer, **biases)
    prompts = make_prompts(4)
    llm = LLM(path, device="cpu")
    try:
        layer = llm.runner.model.layers[0]
        assert layer.self_attn.o_proj.bias is not None
        assert (layer.mlp.gate_up_proj.bias is not None) == biases.get("mlp_bias", False)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == hf_greedy(path, prompts)
    finally:
        llm.shutdown()
