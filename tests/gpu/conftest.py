"""GPU tests run only where CUDA is available (the H100 host, through the GPU kit)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Skip everything under tests/gpu/ without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
