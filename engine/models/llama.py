"""Llama-family decoder (Llama 3.x, SmolLM2, Mistral-style, Qwen2 with QKV bias), with packed QKV and gate/up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.layers import fp8
from engine.layers.activation import SiluAndMul
from engine.layers.embedding import embed_sampled
from engine.layers.gemv import MAX_ROWS, gemv_max_rows, linear_row, norm_linear_row, plan_tile, tune_gemv, tune_rows
from engine.layers.linear import Linear, PackedLinear, onednn_linear, onednn_pack, pack_cpu_linears
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding


@dataclass
class ForwardContext:
    """What a forward pass needs besides token ids: positions, the attention backend and the KV cache."""

    positions: torch.Tensor
    backend: AttentionBackend
    kv_cache: list[torch.Tensor]
    # CUDA graphs: (source rows [T], the sampler's token buffer): row i's token is buffer[rows[i]] where that is not
    # -1 (sampled by the step before, still on the device), else input_ids[i] (engine/layers/embedding.py).
    token_rows: tuple[torch.Tensor, torch.Tensor] | None = None


class DecoderAttention(nn.Module):
    """Self-attention with packed QKV, optional per-head q/k norm (Qwen3) and rope."""

    def __init__(self, cfg, layer_id: int, biases: tuple, qk_norm: bool, rotary: RotaryEmbedding, fused: bool):
        super().__init__()
        qkv_bias, o_bias = biases[:2]  # Biases (qkv, o_proj, MLP): LlamaForCausalLM says which the checkpoint has.
        self.layer_id = layer_id
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=qkv_bias)
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, fused) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, fused) if qk_norm else None
        self.rotary = rotary
        self.sizes = (q_size, kv_size, kv_size)

    def qk_norm_args(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q norm weight, k norm weight, eps) for the fused kernels; (None, None, 0.0) without q/k norm."""
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Project, rotate, attend through the backend, project back."""
        return self.o_proj(self.attend(self.qkv_proj(x), ctx))

    def attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention output [T, heads * head_dim] from the packed QKV projection [T, (Hq + 2 Hkv) * head_dim]."""
        t = qkv.shape[0]
        if ctx.backend.fused_qkv:
            out = ctx.backend.forward_qkv(qkv, self, ctx.positions, ctx.kv_cache[self.layer_id])
            return out.reshape(t, -1)
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(ctx.positions, q, k)
        out = ctx.backend.forward(self.layer_id, q, k, v, ctx.kv_cache[self.layer_id])
        return out.reshape(t, -1)


class DecoderMLP(nn.Module):
    """SwiGLU feed-forward with a packed gate/up projection."""

    def __init__(self, cfg, fused: bool, bias: bool = False):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = PackedLinear(cfg.hidden_size, {"gate": inter, "up": inter}, bias=bias)
        self.down_proj = Linear(inter, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate, activate, project down."""
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm transformer block; the residual is carried separately so norms can fuse the add."""

    # FP8 weights whose activations the add + norm and SwiGLU kernels can quantize (fp8.quantize_model_fp8).
    fp8_fusable = False

    def __init__(self, cfg, layer_id: int, biases: tuple, qk_norm: bool, rotary: RotaryEmbedding, fused: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.self_attn = DecoderAttention(cfg, layer_id, biases, qk_norm, rotary, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.mlp = DecoderMLP(cfg, fused, biases[2])
        # role -> Triton GEMV config for one-row steps (engine/layers/gemv.py: tune_gemv); empty: always unfused.
        self.gemv_plan: dict[str, tuple | None] = {}
        # plan tile (2, 4, 16, 32: gemv.plan_tile) -> role -> Triton config for steps of 2..rows_max token rows:
        # the multi-row GEMV's or the few-row kernel's (tune_rows).
        self.rows_plan: dict[int, dict[str, tuple | None]] = {}
        self.rows_max = MAX_ROWS

    def forward(self, x, residual, ctx: ForwardContext):
        """One block: returns (hidden, residual) with the final residual add deferred to the next norm."""
        rows = x.shape[0]
        plan = self.gemv_plan if rows == 1 else self.rows_plan.get(plan_tile(rows)) if rows <= self.rows_max else None
        if plan:
            return self.forward_row(x, residual, ctx, plan)
        if self.fp8_fusable and fp8.FUSED_QUANTIZE and 0 < fp8.ACT_MIN_ROWS <= rows and x.is_cuda:
            return self.forward_fp8(x, residual, ctx)
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward_fp8(self, x, residual, ctx: ForwardContext):
        """The block with FP8 activations (steps of fp8.ACT_MIN_ROWS+ token rows): the add + norm before the qkv
        and gate/up projections and the SwiGLU before down quantize their outputs in the same kernel."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = fp8.norm_fp8_linear(x, residual, self.input_layernorm, attn.qkv_proj)
        x = attn.o_proj(attn.attend(qkv, ctx))
        gate_up, residual = fp8.norm_fp8_linear(x, residual, self.post_attention_layernorm, mlp.gate_up_proj)
        return fp8.silu_fp8_linear(gate_up, mlp.down_proj), residual

    def forward_row(self, x, residual, ctx: ForwardContext, plan: dict | None = None):
        """The block for one token (batch-1 decode) or a few (plan from rows_plan): the projections the plan names
        run as Triton kernels with the norm before them and the activation after them fused in; the others as in
        forward()."""
        plan, attn, mlp = plan or self.gemv_plan, self.self_attn, self.mlp
        qkv, residual = norm_linear_row(x, residual, self.input_layernorm, attn.qkv_proj, plan["qkv"])
        x = linear_row(attn.attend(qkv, ctx), attn.o_proj, plan["o"])
        act, residual = norm_linear_row(
            x, residual, self.post_attention_layernorm, mlp.gate_up_proj, plan["gate_up"], mlp.act
        )
        return linear_row(act, mlp.down_proj, plan["down"]), residual


def sliding_window_of(cfg) -> int | None:
    """The attention window every layer uses (keys within the last `window` positions), or None for full attention.

    Mistral-style configs set `sliding_window`; Qwen2/Qwen3 configs carry one too but use it only with
    `use_sliding_window`, and then only on some layers, which this engine does not support.
    """
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    if hasattr(cfg, "use_sliding_window"):
        if not cfg.use_sliding_window:
            return None
        raise ValueError(
            "use_sliding_window=True (sliding attention on some layers) is not supported; "
            "set use_sliding_window=False in config.json to run this model with full attention"
        )
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "sliding_attention" for t in layer_types):
        raise ValueError(f"mixed attention layer types {sorted(set(layer_types))} are not supported")
    return int(window)


def head_dim_of(cfg) -> int:
    """The config's head_dim, or hidden_size / num_attention_heads when it has none."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM in the Llama layout."""

    qk_norm = False
    default_qkv_bias = False
    # Whether attention_bias also puts a bias on o_proj (Llama, Qwen3: yes; Qwen2, whose q/k/v always have one: no).
    o_proj_bias = True

    # checkpoint name fragment -> (packed module name, shard)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg, max_positions: int, fused: bool = False):
        super().__init__()
        self.config = cfg
        qkv_bias = bool(getattr(cfg, "attention_bias", self.default_qkv_bias))
        # (q/k/v, o_proj, MLP) biases; Llama's mlp_bias (HF LlamaMLP) puts one on gate, up and down.
        biases = (qkv_bias, qkv_bias and self.o_proj_bias, bool(getattr(cfg, "mlp_bias", False)))
        rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_positions, fused)
        # Given its weight, nn.Embedding skips its random init, which every load overwrites and which costs 1-1.6 s on
        # the meta device, where torch's normal_ imports torch._dynamo (docs/benchmarks.md, CPU start-up).
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, biases, self.qk_norm, rotary, fused) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tied_head_onednn: torch.Tensor | None = None  # oneDNN copy of the tied embedding, see pack_cpu
        self.gemv_alternatives: dict[str, list[tuple]] = {}

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        if ctx.token_rows is not None:
            x = embed_sampled(self.embed_tokens.weight, input_ids, *ctx.token_rows)
        else:
            x = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx)
        x, _ = self.norm(x, residual)
        return x

    def tune_row_kernels(self, stream_bytes: int, margin: float) -> dict[str, tuple | None]:
        """Choose, by timing, which one-row and few-row projections run as fused Triton kernels (see
        engine/layers/gemv.py); returns the one-row plan."""
        self.gemv_alternatives = {}  # role -> configurations to try in the captured step (GraphRunner)
        # With FP8 weights, steps of fp8.ACT_MIN_ROWS+ token rows quantize their activations (forward_fp8): the
        # kernels here, for bf16 activations, serve fewer rows only.
        first = self.layers[0]
        act_from = fp8.ACT_MIN_ROWS if first.fp8_fusable and fp8.ACT_MIN_ROWS > 0 else None
        rows_max = gemv_max_rows() if act_from is None else min(gemv_max_rows(), act_from - 1)
        plan = {}
        if act_from is None or act_from > 1:  # first: may make weights row-major
            plan = tune_gemv(self.layers, stream_bytes, margin, self.gemv_alternatives)
        rows_plans = tune_rows(self.layers, stream_bytes, margin, rows_max)
        for layer in self.layers:
            layer.gemv_plan, layer.rows_plan, layer.rows_max = plan, rows_plans, rows_max
        return plan

    def set_row_plan(self, plan: dict[str, tuple | None]) -> None:
        """Use these one-row GEMV configurations in every layer (from the next forward or graph capture on)."""
        for layer in self.layers:
            layer.gemv_plan = plan

    def pack_cpu(self) -> int:
        """Pre-pack the linear weights (and a copy of a tied embedding for the lm_head) for oneDNN on the CPU."""
        count = pack_cpu_linears(self)
        if count and self.lm_head is None:
            self.tied_head_onednn = onednn_pack(self.embed_tokens.weight)
            count += self.tied_head_onednn is not None
        return count

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits for the given hidden states (written into out when given)."""
        if out is not None:  # CUDA graphs: every graph writes into one shared buffer
            weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            return torch.mm(hidden, weight.t(), out=out)
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.tied_head_onednn is not None:
            return onednn_linear(hidden, self.tied_head_onednn)
        return torch.nn.functional.linear(hidden, self.embed_tokens.weight)  # hidden @ weight.t() is slower on CPU

    def load_weights(self, named_tensors) -> None:
        """Load HF-named checkpoint tensors, packing q/k/v and gate/up; every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        expected_shards: dict[str, int] = {}
        for name, tensor in named_tensors:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied to the embedding
            for frag, (packed, shard) in self.packed_modules.items():
                if f".{frag}." in name:
                    module_name, param_name = name.replace(frag, packed).rsplit(".", 1)
                    self.get_submodule(module_name).load_shard(shard, param_name, tensor)
                    key = f"{module_name}.{param_name}"
                    expected_shards[key] = expected_shards.get(key, 0) + 1
                    loaded.add(key)
                    break
            else:
                if name not in params:
                    continue  # tensors this engine does not use
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(
                        f"weight {name} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(tensor)
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        incomplete = sorted(
            k for k, n in expected_shards.items() if n != len(self.get_submodule(k.rsplit(".", 1)[0]).shard_offsets)
        )
        if missing or incomplete:
            raise ValueError(
                f"checkpoint is missing weights: {(missing + incomplete)[:8]} (of {len(missing) + len(incomplete)})"
            )
