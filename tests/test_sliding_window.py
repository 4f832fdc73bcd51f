"""Mistral-style sliding-window attention: token-identical to HF transformers beyond the window (CPU, fp32)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parent))

from helpers import save_tiny_model  # noqa: E402

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def mistral_path(tmp_path_factory, tokenizer):
    return save_tiny_model("mistral", tmp_path_factory.mktemp("mistral"), tokenizer_from=tokenizer)


def hf_greedy(path, prompts, sliding_window="config"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    if sliding_window != "config":
        cfg.sliding_window = sliding_window
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        outs.append(ids[0, len(p) :].tolist())
    return outs


def test_sliding_window_matches_hf_including_chunked_prefill(mistral_path):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 375, (n,), generator=g).tolist() for n in (3, 9, 20, 40, 65)]
    ref = hf_greedy(mistral_path, prompts)
    # The window (8 tokens) matters for these lengths: full attention gives other tokens.
    assert hf_greedy(mistral_path, prompts, sliding_window=None) != ref
    for kwargs in ({}, {"max_num_batched_tokens": 16}):
        llm = LLM(mistral_path, device="cpu", **kwargs)
        try:
            assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == ref
            # Again, now from the prefix cache: cached blocks outside the window must stay unseen.
            again = llm.generate(prompts, GREEDY)
            assert [o.token_ids for o in again] == ref and sum(o.num_cached_tokens for o in again) > 0
        finally:
            llm.shutdown()


def test_flashinfer_path_refuses_lengths_beyond_the_window(mistral_path, monkeypatch):
    # The FlashInfer path has no sliding window: an explicit longer max_model_len is an error that says what to do
    # (without a GPU, the backend choice is forced; the check comes before FlashInfer is needed).
    monkeypatch.setattr(LLM, "_pick_backend", lambda self: "flashinfer")
    with pytest.raises(ValueError, match=r"max_model_len=64 exceeds this model's 8-token sliding attention window"):
        LLM(mistral_path, device="cpu", max_model_len=64)


def test_partial_sliding_window_configs_are_refused(tmp_path, tokenizer):
    path = save_tiny_model("qwen2", tmp_path / "q", tokenizer_from=tokenizer, use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        LLM(path, device="cpu")
