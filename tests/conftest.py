"""Shared fixtures: tiny random models on disk and their HF references."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# GGUF models converted during the tests go to a folder of this session's, not the user's cache: the first embedded
# load converts the GGUF file (the path HF is compared against), later ones read that copy.
os.environ.setdefault("NANOVLLM_GGUF_CACHE", tempfile.mkdtemp(prefix="nanovllm-gguf-"))
# GPU engines time their start-up choices every time, as the tests expect, and keep none in the user's cache; the
# tests of kept choices name a folder of their own.
os.environ.setdefault("NANOVLLM_TUNE_CACHE", "0")

from helpers import save_tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny byte-level BPE tokenizer."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """One saved random model per supported family."""
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(arch, root / arch, tokenizer_from=tokenizer) for arch in ("qwen3", "qwen2", "llama")}


@pytest.fixture(scope="session")
def qwen3_path(tiny_models):
    """Folder of the tiny Qwen3 model."""
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def qwen3_llm(qwen3_path):
    """A shared engine on the tiny Qwen3 model."""
    from engine import LLM

    llm = LLM(qwen3_path, device="cpu")
    yield llm
    llm.shutdown()


@pytest.fixture(scope="session")
def embedded_llm():
    """The engine on the embedded SmolLM2-135M GGUF."""
    from engine import LLM

    llm = LLM(None, device="cpu", max_model_len=2048, max_num_seqs=32)
    yield llm
    llm.shutdown()
