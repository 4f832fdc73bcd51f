"""Imported only by the server of the Triton compile processes (engine/compile_pool.py): what each worker would
otherwise load for itself (torch, Triton's compiler, the engine's kernel modules, Triton's hash of its own source),
loaded once before the workers fork from it."""

import triton.compiler  # noqa: F401 - loaded for the workers

import engine.attention.triton_decode  # noqa: F401
import engine.layers.fp8  # noqa: F401
import engine.layers.fused_qkv  # noqa: F401
import engine.layers.gemv  # noqa: F401

try:
    from triton.runtime.cache import triton_key
except ImportError:  # a Triton that keeps it elsewhere: each worker computes it
    pass
else:
    triton_key()  # ~0.35 s of hashing, cached per process
