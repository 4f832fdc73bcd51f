"""The start-up timings' choices kept on disk, so that later starts of the same model shape on the same GPU and
software apply them instead of timing again.

Why: on a warm Triton cache the timings (weight layouts, one-row and few-row Triton projections, FP8 GEMM tiles, and
the one-row plan timed in the decode step) were the largest part of a start (docs/benchmarks.md, section 10). A
record is named by everything its choices depend on: the GPU (name, SMs, memory, compute capability), torch, CUDA,
Triton and FlashInfer versions, the engine's own source, the model's layer shapes and dtypes, the page size, the
attention path and every NANOVLLM_ switch. So a changed driver stack or engine times again; what a record cannot
know is a card running at other clocks than the one that timed it, where its choices may be a few percent off.
A record is a Python literal (ast.literal_eval reads it: tuples and integer keys survive, no code runs).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from engine.config import cache_folder

logger = logging.getLogger("engine")

RECORD_FORMAT = 1
# Switches that name where things are kept, label a run, say how kernels compile or how tokens are sampled after the
# model (NANOVLLM_FUSED_SAMPLE), not what the timings choose.
UNRELATED_SWITCHES = (
    "NANOVLLM_COMMIT",
    "NANOVLLM_FUSED_SAMPLE",
    "NANOVLLM_GGUF_CACHE",
    "NANOVLLM_GGUF_CACHE_MAX_GIB",
    "NANOVLLM_TUNE_CACHE",
    "NANOVLLM_COMPILE_THREADS",
    "NANOVLLM_COMPILE_PROCESSES",
)


def tune_cache_dir() -> Path | None:
    """NANOVLLM_TUNE_CACHE: the folder of kept start-up choices (default: nanovllm/tuning under $XDG_CACHE_HOME or
    ~/.cache); "0" keeps none, so every start times again."""
    return cache_folder("NANOVLLM_TUNE_CACHE", "tuning")


@functools.cache
def _engine_source_digest() -> str:
    # Any change to the engine's code (a kernel, a candidate list, a margin) may change what the timings choose.
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(package)
        return str(getattr(module, "__version__", ""))


def _device_key(device: torch.device) -> tuple:
    if device.type != "cuda":
        return (device.type,)
    p = torch.cuda.get_device_properties(device)
    return (p.name, p.multi_processor_count, p.total_memory, (p.major, p.minor), torch.version.cuda)


def record_path(net: nn.Module, device: torch.device, **settings) -> Path | None:
    """Where the record of this model shape's choices belongs on this device, software and switches (None with
    the cache off). net: the model as built, before its weights load (meta tensors do); settings: the engine
    settings the timings depend on (page size, attention path, quantization)."""
    root = tune_cache_dir()
    if root is None:
        return None
    layer = net.layers[0].state_dict()
    outer = {k: v for k, v in net.state_dict().items() if not k.startswith("layers.")}
    shapes = [(k, tuple(v.shape), str(v.dtype)) for part in (layer, outer) for k, v in sorted(part.items())]
    switches = sorted(
        (k, v) for k, v in os.environ.items() if k.startswith("NANOVLLM_") and k not in UNRELATED_SWITCHES
    )
    key = (
        RECORD_FORMAT,
        _device_key(device),
        (torch.__version__, _version("triton"), _version("flashinfer-python") or _version("flashinfer")),
        _engine_source_digest(),
        type(net).__name__,
        len(net.layers),
        shapes,
        sorted(settings.items()),
        switches,
    )
    return root / f"{type(net).__name__.lower()}-{hashlib.sha256(repr(key).encode()).hexdigest()[:20]}.txt"


def _column_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and not weight.is_contiguous() and weight.t().is_contiguous()


def tuned_state(net: nn.Module) -> dict:
    """What the start-up timings chose, as plain values: the linear weights stored column-major, the decoder
    layers' one-row and few-row plans, and each FP8 linear's GEMM tiles."""
    first = net.layers[0]
    return {
        "format": RECORD_FORMAT,
        "column_major": sorted(
            name for name, m in net.named_modules() if isinstance(m, nn.Linear) and _column_major(m.weight)
        ),
        "gemv_plan": dict(first.gemv_plan),
        "rows_plan": {tile: dict(plan) for tile, plan in first.rows_plan.items()},
        "rows_max": first.rows_max,
        "fp8": {
            name: (dict(m.fp8_configs), None if m.fp8_act_configs is None else dict(m.fp8_act_configs))
            for name, m in net.named_modules()
            if isinstance(m, nn.Linear) and getattr(m, "fp8_configs", None) is not None
        },
    }


def apply_tuned_state(net: nn.Module, state: dict) -> None:
    """Make the model as the timings that wrote `state` left it; raises ValueError, changing nothing, when the
    state does not fit this model."""
    modules = dict(net.named_modules())
    if not isinstance(state, dict) or state.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a record of format {RECORD_FORMAT}")
    try:  # every part is read before anything changes
        column = set(state["column_major"])
        gemv_plan, rows_max = dict(state["gemv_plan"]), int(state["rows_max"])
        rows_plan = {int(tile): dict(plan) for tile, plan in state["rows_plan"].items()}
        fp8_configs = {
            name: (dict(configs), None if act is None else dict(act)) for name, (configs, act) in state["fp8"].items()
        }  # no FP8-activation choices (None) is not an empty choice ({}: cuBLASLt at every tile)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"a malformed record ({err!r})") from err
    for name in column | set(fp8_configs):
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"the record names {name!r}, which is no linear layer of this model")
    for name, m in modules.items():
        if isinstance(m, nn.Linear) and (name in column) != _column_major(m.weight):
            m.weight.data = m.weight.data.t().contiguous().t() if name in column else m.weight.data.contiguous()
    for layer in net.layers:  # one plan object for all layers, as the timings leave it
        layer.gemv_plan, layer.rows_plan, layer.rows_max = gemv_plan, rows_plan, rows_max
    for name, (configs, act_configs) in fp8_configs.items():
        modules[name].fp8_configs, modules[name].fp8_act_configs = configs, act_configs
    net.gemv_alternatives = {}  # the plan is final: no timing in the decode step either


def load_record(path: Path | None, net: nn.Module) -> bool:
    """Apply the record at path when there is one that fits; False (the timings then run) otherwise."""
    if path is None or not path.is_file():
        return False
    try:
        apply_tuned_state(net, ast.literal_eval(path.read_text()))
    except (OSError, ValueError, SyntaxError, MemoryError, RecursionError) as err:
        logger.warning("ignoring the start-up choices in %s (%s); timing again", path, err)
        return False
    logger.info("start-up timings: the choices of an earlier start on this GPU, %s (NANOVLLM_TUNE_CACHE=0 times "
                "them again)", path)  # fmt: skip
    return True


def save_record(path: Path | None, net: nn.Module) -> None:
    """Keep the model's current choices at path (best effort: a write that fails only logs a warning)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(repr(tuned_state(net)) + "\n")
        os.replace(tmp, path)  # a concurrent start reads the old record or the new one, never half of one
    except OSError as err:
        logger.warning("could not keep the start-up choices in %s: %s", path, err)
