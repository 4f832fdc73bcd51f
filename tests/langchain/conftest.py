"""The embedded model as a ChatNanoVLLM, sharing one engine with the standard suites."""

import pytest

from langchain_nanovllm import ChatNanoVLLM

ENGINE = {"max_model_len": 2048, "max_num_seqs": 16}


@pytest.fixture(scope="session")
def chat():
    """A greedy ChatNanoVLLM on the embedded model."""
    return ChatNanoVLLM(temperature=0.0, max_tokens=32, engine_kwargs=ENGINE)
