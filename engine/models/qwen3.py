"""Qwen3 dense: the Llama layout plus per-head RMSNorm on q and k."""

from engine.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 decoder."""

    qk_norm = True
