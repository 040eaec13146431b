"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2 (q/k/v bias).

One readable decoder in plain PyTorch, gpt-fast style. Parameter names are exactly the Hugging Face names
(`model.layers.N.self_attn.q_proj.weight`, ...), so an HF safetensors checkpoint loads with no mapping at all;
GGUF files go through `gguf_tensor_name()` and `from_gguf_tensor()` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.kv_cache import AttentionCache, attention
from glmstack.engine.models.layers import RMSNorm, apply_rotary
from glmstack.engine.native.fused_decoder import fused_llama_layers


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Llama with attention_bias
    o_bias: bool = False  # only Llama's attention_bias biases the output projection too
    mlp_bias: bool = False
    # GGUF stores Llama's q/k rows permuted for llama.cpp's adjacent-pair rotary; Qwen2 (NeoX rotary) is not.
    gguf_permuted_qk: bool = True
    # Llama 3.1 GGUFs carry the rope scaling as per-frequency divisors (`rope_freqs.weight`), not metadata.
    rope_factors: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaConfig:
        arch = (cfg.get("architectures") or [""])[0]
        heads = cfg["num_attention_heads"]
        is_qwen2 = arch.startswith("Qwen2") or cfg.get("model_type") == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            gguf_permuted_qk=not is_qwen2,
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], arch: str, tensor_names: dict[str, tuple[int, ...]]) -> LlamaConfig:
        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        kv_heads = key("attention.head_count_kv", heads)
        head_dim = int(key("attention.key_length", 0)) or hidden // heads
        vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        vocab = vocab or tensor_names.get("token_embd.weight", (0,))[0]
        rope_scaling = None
        if key("rope.scaling.type") == "linear" and key("rope.scaling.factor"):
            rope_scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(key("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            gguf_permuted_qk=arch != "qwen2",
            rope_factors="rope_freqs.weight" in tensor_names,
        )

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters; published configs still have it at top level.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return dict(scaling)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend the band in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(is_medium, blended, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden = config.hidden_size
        # q, k and v in one matmul (rows [q | k | v]): one weight read and one kernel launch instead of three.
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(hidden, qkv_rows, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(bsz, seqlen, heads + 2 * kv_heads, self.head_dim)
        qk = apply_rotary(qkv[:, :, : heads + kv_heads], cos, sin)  # q and k heads rotated together
        q = qk[:, :, :heads].transpose(1, 2)
        k = qk[:, :, heads:].transpose(1, 2)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        out = attention(q, k, v, layer, cache)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=config.mlp_bias)  # rows [gate | up]
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                cache: AttentionCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        if config.rope_factors:
            self.register_buffer("rope_factors", torch.ones(config.head_dim // 2))

    def init_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers after loading onto `device` from the meta device."""
        inv_freq = rope_inv_freq(self.config).to(device)
        if self.config.rope_factors:
            inv_freq = inv_freq / self.rope_factors.float()
        self.inv_freq = inv_freq

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: AttentionCache | None = None,
        last_only: bool = False,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T]. Returns logits [B, T, V] (or [B, 1, V] with last_only, or
        [B, len(logit_rows), V] for just those positions — the batched runner's sampling rows).

        With a cache, the new keys are appended after what it already holds, and attention is causal over
        the whole cached sequence; without one this is a plain full-sequence forward.
        """
        x = self.model.embed_tokens(input_ids)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]  # [B, T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        fused = fused_llama_layers(self, x, cos, sin, cache)  # None unless a native paged step
        if fused is not None:
            x = fused
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        elif logit_rows is not None:
            x = x[:, logit_rows]
        head = getattr(self.lm_head, "native_forward", None)  # final norm fused into the head's GEMV
        logits = None if head is None else head(x.reshape(-1, x.shape[-1]), norm=self.model.norm)
        if logits is not None:  # (the vocabulary size spelled out: a step may sample no row at all)
            return logits.view(*x.shape[:-1], logits.shape[-1])
        return self.lm_head(self.model.norm(x))

    # ---- checkpoint formats -------------------------------------------------------------------------

    @staticmethod
    def hf_tensor_name(name: str) -> str | None:
        """HF names are ours except the fused projections, whose pieces the loader joins (join_pieces)."""
        if name.endswith("rotary_emb.inv_freq"):
            return None  # a cache some exporters saved; recomputed
        return _fused_name(name)

    @staticmethod
    def gguf_tensor_name(name: str) -> str | None:
        hf = _gguf_name(name)
        return None if hf is None else _fused_name(hf)

    def join_pieces(self, name: str, pieces: dict[str, torch.Tensor]) -> torch.Tensor | None:
        order = ("q", "k", "v") if ".qkv_proj." in name else ("gate", "up")
        if not all(p in pieces for p in order):
            return None
        return torch.cat([pieces[p] for p in order], dim=0)

    def from_gguf_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's conversion of q/k rows (HF rotate-half → adjacent pairs) for Llama GGUFs."""
        cfg = self.config
        if cfg.gguf_permuted_qk and ".qkv_proj." in name and name.endswith(("#q", "#k")):
            return unpermute_qk(tensor, cfg.num_heads if name.endswith("#q") else cfg.num_kv_heads)
        return tensor


_FUSED = {
    "self_attn.q_proj": "self_attn.qkv_proj#q",
    "self_attn.k_proj": "self_attn.qkv_proj#k",
    "self_attn.v_proj": "self_attn.qkv_proj#v",
    "mlp.gate_proj": "mlp.gate_up_proj#gate",
    "mlp.up_proj": "mlp.gate_up_proj#up",
}


def _fused_name(name: str) -> str:
    """`model.layers.3.self_attn.k_proj.bias` -> `model.layers.3.self_attn.qkv_proj.bias#k`."""
    module, _, kind = name.rpartition(".")
    for split, fused in _FUSED.items():
        if module.endswith(split):
            target, piece = fused.split("#")
            return f"{module[: -len(split)]}{target}.{kind}#{piece}"
    return name


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k: per head, interleave the two rotary halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{index}.{_GGUF_LAYER_NAMES[rest]}"
    if name == "rope_freqs.weight":
        return "rope_factors"
    return name  # unknown names surface as "unexpected tensor" errors in the loader


Model = LlamaForCausalLM
