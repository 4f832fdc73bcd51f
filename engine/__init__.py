"""nano-vllm-style inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill."""

from engine.config import EngineConfig
from engine.llm import LLM, RequestFailedError
from engine.llm_engine import EngineShutdownError
from engine.loader import ModelLoadError
from engine.request import RequestOutput, StreamDelta
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "EngineConfig",
    "EngineShutdownError",
    "ModelLoadError",
    "RequestFailedError",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
]
