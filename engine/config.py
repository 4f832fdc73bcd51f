"""Engine configuration: every knob the engine takes, validated once at construction."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """The value of the environment variable name (default when unset), which must be one of choices: the engine's
    A/B switches, read where the code they switch is built."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def env_whole_number(name: str, default: int, what: str) -> int:
    """The value of the environment variable name (default when unset) as a whole number (not negative) of `what`,
    which the error names: the engine's numeric A/B switches."""
    value = os.environ.get(name, str(default))
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} must be a whole number of {what}")
    return int(value)


def cache_folder(variable: str, name: str) -> Path | None:
    """A folder the engine keeps things in between runs: the environment variable's value, "0" for none, by
    default nanovllm/<name> under $XDG_CACHE_HOME or ~/.cache."""
    value = os.environ.get(variable, "")
    if value == "0":
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "nanovllm" / name


class EngineConfig(BaseModel):
    """Settings of one engine; unknown keys are rejected so nothing is silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(
        default=None, ge=1, description="Longest prompt + output; None takes the model's limit, capped at 8192."
    )
    max_num_seqs: int = Field(default=256, ge=1, description="Most requests in one batch.")
    max_num_batched_tokens: int = Field(default=8192, ge=1, description="Token budget of one step.")
    block_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Tokens per KV cache block; None: 64 on the FlashInfer path (on an H100, docs/benchmarks.md: "
        "decode steps 1.2% faster, warm-prefix TTFT 4.2 -> 3.6 ms, than 16), 16 on the torch path.",
    )
    num_kvcache_blocks: int | None = Field(default=None, ge=1, description="Override the computed KV cache size.")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0.0, description="KV cache size on the CPU, in GiB.")
    enable_prefix_caching: bool = True
    stream_interval: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per streamed delta after the first, which goes at once; the final delta carries the "
        "rest. None: one while at most 3 requests stream, else half the number streaming, at most 16. Each delta "
        "wakes a consumer, and every consumer in the process shares the GIL with the engine (docs/benchmarks.md, "
        "section 12: 32 streams at 0.23x the engine's tok/s with a delta per token, 0.63x with 16).",
    )
    enforce_eager: bool = False
    attention_backend: Literal["auto", "torch", "flashinfer"] = "auto"
    enable_cascade_attention: bool = Field(
        default=True,
        description="Cascade attention for decode batches sharing a cached prefix (FlashInfer only), used when at "
        "least cascade_min_requests share at least cascade_min_prefix_tokens, and that prefix's length times the "
        "number of requests reaches cascade_min_shared_tokens. On an H100 (docs/benchmarks.md, section 5) it pays "
        "for 1k-token prefixes from 16 requests (1.04x; 1.15x at 64), 2k from 8 (1.15x), 4k from 4 (1.10x; 2.04x at "
        "64), and costs up to 16% below that; on an H200, 4k from 3 requests (1.13x; 1.03x end to end), 3k from 4 "
        "(1.07x), 2k from 6 (1.14x; 1.09x end to end), while 2 requests sharing 6k tied end to end.",
    )
    cascade_min_requests: int = Field(default=3, ge=2, description="Fewest decoding requests for cascade.")
    cascade_min_prefix_tokens: int = Field(
        default=1024, ge=1, description="Fewest shared prefix tokens for cascade (measured, above)."
    )
    cascade_min_shared_tokens: int = Field(
        default=12288,
        ge=1,
        description="Fewest requests x shared prefix tokens for cascade (measured, above).",
    )
    freeze_gc: bool = Field(
        default=True,
        description="After start-up, move every object Python's garbage collector tracks to its permanent generation "
        "(gc.freeze, as vLLM does), so a full collection while serving scans only what serving made (on the CI "
        "machine a 64-request batch met a 171-211 ms full collection without it; benchmarks/host_gc.py). It is "
        "process-wide: objects made before LLM() that later become cyclic garbage wait for shutdown(), which "
        "unfreezes; False leaves the collector alone.",
    )
    seed: int = 0
    quantization: Literal["fp8"] | None = Field(
        default=None,
        description='"fp8" stores the decoder layers\' projections as float8 e4m3 with one scale per output row '
        "(embedding, lm_head and norms stay in dtype; activations too in one-row steps, per-token FP8 from 2 rows on, "
        "quantized in the norm and SwiGLU kernels; see NANOVLLM_FP8_ACT_MIN_ROWS): half their bytes, so faster "
        "decode where streaming weights bounds a step. "
        "CUDA GPUs of compute capability 8.9+ only; None keeps the weights as loaded.",
    )
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description='"dummy" fills random weights (benchmarks on real shapes without checkpoints).'
    )


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when a GPU is visible, else "cpu"."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return device


def resolve_dtype(dtype: str, device: str):
    """Turn "auto" into bf16 on CUDA and fp32 on the CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)
