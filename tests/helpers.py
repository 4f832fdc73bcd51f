"""Tiny random HF models saved to disk, shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch

EMBEDDED_TOKENIZER_VOCAB = 49152


def tiny_config(arch: str, vocab_size: int = 512, **overrides):
    """A small config of the given family, with GQA and enough layers to catch layout bugs."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": 16, "tie_word_embeddings": False, **common})
    if arch == "qwen2":
        # Tied embeddings with the default init make the model echo its input; a larger init avoids that.
        return Qwen2Config(tie_word_embeddings=True, initializer_range=0.2, **common)
    if arch == "llama":
        return LlamaConfig(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            **common,
        )
    if arch == "mistral":
        # A window much shorter than the test prompts, so attending beyond it would change the output.
        return MistralConfig(**{"sliding_window": 8, "tie_word_embeddings": False, **common})
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, seed: int = 0, tokenizer_from=None, **overrides) -> Path:
    """Build a random HF model, save it (safetensors) with a tokenizer, and return the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb them so a bug there would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        tokenizer_from.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "<|im_end|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France. Berlin is the capital of Germany.",
        "Hello world! How are you today? Ünïcödé text: 日本語, emoji 🙂.",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def wait_idle(llm, timeout: float = 20.0) -> dict:
    """Wait until the engine holds no blocks and has no requests; return its stats."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = llm.stats()
        if s["kv_blocks_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0:
            return s
        time.sleep(0.01)
    return llm.stats()


def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: Metaspace ("▁" for spaces, prepended to the first word), byte-fallback tokens
    <0xNN> as ordinary vocabulary, and the Replace/ByteFallback/Fuse/Strip decoder of converted SentencePiece
    models, trained on a few sentences."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Hello world, this is a test.",
        "The capital of France is Paris.",
        "Ünïcödé text with 日本語 and emoji 🙂",
        "  leading spaces and   multiple   spaces",
        "new\nlines\n\nhere",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens])
    )
    # The trainer registers the byte tokens as special; in SentencePiece models they are ordinary vocabulary.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in byte_tokens]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_fp8_weights_into_hf(hf, llm) -> None:
    """Give the HF model `hf` the weights an FP8 engine's projections stand for (w8 x row scale), unpacked into
    q/k/v and gate/up; everything else stays as hf has it."""
    from engine.layers.fp8 import dequantize_fp8

    for ours, theirs in zip(llm.runner.model.layers, hf.model.layers, strict=True):
        for packed, owner, names in (
            (ours.self_attn.qkv_proj, theirs.self_attn, {"q": "q_proj", "k": "k_proj", "v": "v_proj"}),
            (ours.self_attn.o_proj, theirs.self_attn, {None: "o_proj"}),
            (ours.mlp.gate_up_proj, theirs.mlp, {"gate": "gate_proj", "up": "up_proj"}),
            (ours.mlp.down_proj, theirs.mlp, {None: "down_proj"}),
        ):
            full = dequantize_fp8(packed.weight, packed.weight_scale, torch.float32)
            for shard, name in names.items():
                start, size = packed.shard_offsets[shard] if shard else (0, full.shape[0])
                target = getattr(owner, name).weight
                with torch.no_grad():
                    target.copy_(full[start : start + size].to(target.device, target.dtype))
