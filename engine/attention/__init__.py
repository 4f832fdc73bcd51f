"""Attention backends over the paged KV cache: a torch reference and FlashInfer."""

from engine.attention.base import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "make_backend"]


def make_backend(name: str, runner, config, window: int | None = None) -> AttentionBackend:
    """Create the attention backend the engine asked for (window: sliding attention window, torch backend)."""
    scale = runner.head_dim**-0.5
    if name == "flashinfer":
        from engine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(runner, config)
    from engine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend(runner.num_heads, runner.num_kv_heads, runner.head_dim, scale, window)
