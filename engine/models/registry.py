"""Maps a config's architecture name to the engine's model class."""

from __future__ import annotations

from engine.models.llama import LlamaForCausalLM
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class_for(hf_config) -> type[LlamaForCausalLM]:
    """The model class for this config, or a ValueError listing the supported architectures."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not archs:
        # GGUF-derived configs may carry only model_type.
        by_type = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }
        mt = getattr(hf_config, "model_type", None)
        archs = [by_type[mt]] if mt in by_type else [f"model_type={mt}"]
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {archs}; supported: {sorted(MODEL_REGISTRY)}")
