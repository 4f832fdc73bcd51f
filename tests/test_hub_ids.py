"""Hub ids (owner/name) resolve through huggingface_hub's local cache, with no network needed."""

from __future__ import annotations

import shutil

import pytest

from engine import LLM, SamplingParams
from engine.loader import ModelLoadError


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a cache miss must not reach for the network
    return cache


def put_in_cache(cache, repo_id: str, folder) -> None:
    """Lay a model folder out the way huggingface_hub stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_cache(hub_cache, qwen3_path, qwen3_llm):
    put_in_cache(hub_cache, "acme/tiny-qwen3", qwen3_path)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = LLM("acme/tiny-qwen3", device="cpu")
    try:
        assert llm.model_name == "acme/tiny-qwen3"
        assert llm.generate([[5, 6, 7]], p)[0].token_ids == qwen3_llm.generate([[5, 6, 7]], p)[0].token_ids
    finally:
        llm.shutdown()


def test_hub_id_missing_from_the_cache_says_what_to_do(hub_cache):
    with pytest.raises(ModelLoadError, match=r"Hub model 'acme/absent' is not in the local Hugging Face cache"):
        LLM("acme/absent", device="cpu")
