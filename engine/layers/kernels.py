"""Optional fused CUDA kernels (FlashInfer), chosen once at start; torch code is the fallback everywhere."""

from __future__ import annotations

import importlib.util


def flashinfer_available() -> bool:
    """True when FlashInfer is importable (it needs CUDA)."""
    return importlib.util.find_spec("flashinfer") is not None
