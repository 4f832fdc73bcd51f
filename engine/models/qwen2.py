"""Qwen2 / Qwen2.5: the Llama layout with biases on q, k and v."""

from engine.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 decoder (QKV bias is always on)."""

    default_qkv_bias = True
    o_proj_bias = False

    def __init__(self, cfg, max_positions: int, fused: bool = False):
        # Qwen2 configs carry no attention_bias field; the biases are part of the architecture.
        if getattr(cfg, "attention_bias", None) is None:
            cfg.attention_bias = True
        super().__init__(cfg, max_positions, fused)
