"""Optional fused CUDA kernels (FlashInfer, Triton), chosen once at start; torch code is the fallback everywhere."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import torch

from engine.config import env_choice

# One thread of the program asks the copy engine to pull [ptr, ptr + size) into L2 (sm90 bulk prefetch); the
# output register only satisfies Triton's inline-asm form.
L2_PREFETCH_ASM = (
    "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
    "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }"
)


def flashinfer_available() -> bool:
    """True when FlashInfer is importable (it needs CUDA)."""
    return importlib.util.find_spec("flashinfer") is not None


def triton_available() -> bool:
    """True when Triton is importable (the engine's own kernels: fused q/k, one-row GEMVs, split-KV decode)."""
    return importlib.util.find_spec("triton") is not None


def pdl_mode() -> str:
    """NANOVLLM_PDL: "1" (programmatic dependent launch with L2 weight prefetch, the default), "wait" (launch
    without the prefetch) or "0" (plain launches)."""
    return env_choice("NANOVLLM_PDL", "1", ("0", "wait", "1"))


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9  # griddepcontrol needs sm90


def pdl_enabled(device: torch.device | str) -> bool:
    """Whether the engine's Triton kernels on this device launch with programmatic dependent launch.

    Why: a decode step is a chain of small kernels (six per layer at batch 1) whose ramp-up and tail leave the
    memory system idle (docs/benchmarks.md). Launched this way, each kernel lets the next one start as soon as
    all its programs run; the next one streams its weights into L2, then waits (griddepcontrol.wait) for the
    previous kernel's results before it reads any activation or writes anything."""
    device = torch.device(device)
    if pdl_mode() == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def l2_prefetch_enabled(device: torch.device | str) -> bool:
    """Whether PDL-launched GEMVs prefetch their weights into L2 before waiting (NANOVLLM_PDL=1)."""
    return pdl_enabled(device) and pdl_mode() == "1"


def launch_options(device: torch.device | str) -> dict:
    """Extra Triton launch options for an engine kernel: launch_pdl where PDL is on (every such kernel waits)."""
    return {"launch_pdl": True} if pdl_enabled(device) else {}


def resident_programs(compiled) -> int | None:
    """How many programs of a launched Triton kernel (what `kernel[grid](...)` returns) one SM holds at once, as the
    CUDA driver's occupancy query answers for its registers, shared memory and threads; None where it cannot say."""
    try:
        count = ctypes.c_int()
        err = _libcuda().cuOccupancyMaxActiveBlocksPerMultiprocessor(
            ctypes.byref(count),
            ctypes.c_void_p(compiled.function),
            ctypes.c_int(compiled.metadata.num_warps * 32),
            ctypes.c_size_t(compiled.metadata.shared),
        )
    except (OSError, AttributeError, TypeError):
        return None
    return count.value if err == 0 and count.value > 0 else None


@functools.cache
def _libcuda() -> ctypes.CDLL:
    # The driver library, opened once (an OSError here means no driver: resident_programs answers None).
    return ctypes.CDLL("libcuda.so.1")
