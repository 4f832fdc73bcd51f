"""Optional fused CUDA kernels (FlashInfer, Triton), chosen once at start; torch code is the fallback everywhere."""

from __future__ import annotations

import importlib.util


def flashinfer_available() -> bool:
    """True when FlashInfer is importable (it needs CUDA)."""
    return importlib.util.find_spec("flashinfer") is not None


def triton_available() -> bool:
    """True when Triton is importable (the engine's own kernels: fused q/k, one-row GEMVs, split-KV decode)."""
    return importlib.util.find_spec("triton") is not None
