"""The GLM v2 architecture: ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B(-chat) 2024 (spec sections 2, 3).

A pre-norm decoder like Llama, with three differences that matter:
- q, k and v come from one fused `query_key_value` projection (biased), with few KV heads (multi-query
  groups);
- rotary embedding touches only the first half of each head's dims, and rotates *adjacent* pairs
  (2i, 2i+1), not Llama's halves;
- the SwiGLU input projection `dense_h_to_4h` is fused too: first half gate, second half up.

Parameter names are the THUDM checkpoint names (`transformer.encoder.layers.N.self_attention...`), so the
original remote-code checkpoints load unchanged. transformers' converted layout (`GlmForCausalLM`,
model_type "glm") splits `query_key_value` into q/k/v_proj: those become pieces of our fused parameter and
are joined on load (`join_pieces`). GGUF files use llama.cpp's "chatglm" arch names. ChatGLM-6B (v1) shares
model_type "chatglm" but is a different network: `resolve()` sends its configs to chatglm_v1.py.

With int8/int4 linears, a paged serving step runs its layers as native calls (native/fused_decoder.py); the
modules below are the reference it matches, and the path for everything else.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.chat_format import ChatFormat, glm_chat_format_for_model
from glmstack.engine.errors import UnsupportedArchitectureError
from glmstack.engine.kv_cache import AttentionCache, attention
from glmstack.engine.models.layers import RMSNorm, apply_interleaved_rotary
from glmstack.engine.native.fused_decoder import fused_glm_layers
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.glm import load_glm_checkpoint_tokenizer

if TYPE_CHECKING:
    from glmstack.engine.loading.checkpoint import Checkpoint


def resolve(config: dict[str, Any]) -> ModuleType:
    """ChatGLM-6B (v1) and the v2 models all say model_type "chatglm" / "ChatGLMModel". Only v1's config
    names its FFN `inner_hidden_size` and carries `position_encoding_2d` (v2 has `ffn_hidden_size`)."""
    if "inner_hidden_size" in config or "position_encoding_2d" in config:
        return importlib.import_module("glmstack.engine.models.chatglm_v1")
    return sys.modules[__name__]


@dataclass
class ChatGLMConfig:
    vocab_size: int  # padded_vocab_size: rows of the embedding and the output layer
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # multi_query_group_num
    head_dim: int  # kv_channels
    rotary_dim: int  # dims of each head that rotate (half of head_dim in every released model)
    rope_theta: float = 10000.0  # 10000 * rope_ratio
    norm_eps: float = 1e-5
    rmsnorm: bool = True
    qkv_bias: bool = True
    seq_length: int = 8192
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ChatGLMConfig:
        return _from_thudm(cfg) if _is_thudm(cfg) else _from_transformers(cfg)

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], arch: str, tensor_names: dict[str, tuple[int, ...]]
    ) -> ChatGLMConfig:
        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", 0)) or hidden // heads
        # llama.cpp's chatglm converter writes no vocab_size; the embedding's rows are the padded vocab.
        vocab = key("vocab_size") or tensor_names.get("token_embd.weight", (0,))[0]
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            ffn_hidden_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rotary_dim=int(key("rope.dimension_count", 0)) or head_dim // 2,
            rope_theta=float(key("rope.freq_base", 10000.0)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            seq_length=int(key("context_length", 8192)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_qkv.bias" in tensor_names or "blk.0.attn_q.bias" in tensor_names,
        )

    @property
    def context_length(self) -> int:
        return self.seq_length


def _is_thudm(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "chatglm" or "ffn_hidden_size" in cfg


def _from_thudm(cfg: dict[str, Any]) -> ChatGLMConfig:
    """The remote-code ChatGLMConfig (spec 2.1). Flags no released model sets are refused, not ignored."""
    refused = {
        "add_bias_linear": True,
        "apply_residual_connection_post_layernorm": True,
        "post_layer_norm": False,
    }
    for field, bad in refused.items():
        if cfg.get(field, not bad) == bad:
            raise UnsupportedArchitectureError(f"ChatGLM config with {field}={bad} is not supported")
    if cfg.get("quantization_bit"):
        raise UnsupportedArchitectureError(
            f"pre-quantized ChatGLM checkpoints (quantization_bit={cfg['quantization_bit']}) are not "
            "supported; load the fp16/bf16 checkpoint instead"
        )
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("kv_channels") or cfg["hidden_size"] // heads
    return ChatGLMConfig(
        vocab_size=cfg.get("padded_vocab_size") or cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        num_layers=cfg["num_layers"],
        num_heads=heads,
        num_kv_heads=cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else heads,
        head_dim=head_dim,
        # The reference builds RotaryEmbedding(kv_channels // 2): only the first half of each head rotates.
        rotary_dim=head_dim // 2,
        rope_theta=10000.0 * float(cfg.get("rope_ratio", 1)),
        norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        rmsnorm=bool(cfg.get("rmsnorm", True)),
        qkv_bias=bool(cfg.get("add_qkv_bias", False)),
        seq_length=cfg.get("seq_length", 8192),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _from_transformers(cfg: dict[str, Any]) -> ChatGLMConfig:
    """transformers' GlmConfig / Glm4Config. Defaults are transformers' own for fields a config may omit;
    transformers 5 moved rope_theta and partial_rotary_factor into rope_parameters."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedArchitectureError(f"GLM rope scaling {rope!r} is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    partial = cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 0.5
    return ChatGLMConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        norm_eps=cfg.get("rms_norm_eps", 1.5625e-07),
        qkv_bias=bool(cfg.get("attention_bias", True)),
        seq_length=cfg.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def rope_inv_freq(config: ChatGLMConfig) -> torch.Tensor:
    # fp32 throughout, exactly as the THUDM code and transformers do (with base 5e6 the last bits matter).
    dim = config.rotary_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def make_norm(config: ChatGLMConfig) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)  # `rmsnorm: false` configs


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        # Rows: [q (heads·d) | k (groups·d) | v (groups·d)], contiguous blocks (unlike v1's per-head interleave).
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_rows, bias=config.qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.query_key_value(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_interleaved_rotary(q, cos, sin), apply_interleaved_rotary(k, cos, sin)
        # Query head j reads KV group j // (heads / groups), which is what enable_gqa does.
        out = attention(q, k, v, layer, cache)
        return self.dense(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # first half is the gate
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        # Residuals take the un-normalised input (apply_residual_connection_post_layernorm=false).
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLMConfig, block: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(config) for _ in range(config.num_layers))
        self.final_layernorm = make_norm(config)


class Transformer(nn.Module):
    """Only a namespace, so parameter names match the checkpoints (`transformer.encoder.layers.N...`)."""

    def __init__(self, config: ChatGLMConfig, block: type[nn.Module]) -> None:
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config, block)
        self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class ChatGLMForCausalLM(nn.Module):
    config_class = ChatGLMConfig
    block_class: type[nn.Module] = GLMBlock
    output_weight_name = "transformer.output_layer.weight"  # what tie_weights() fills when tied

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, self.block_class)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.transformer.output_layer.weight = self.transformer.embedding.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: AttentionCache | None = None,
        last_only: bool = False,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T] (positions count from 0 at `[gMASK]`). Returns logits [B, T, V]
        (only the last position with `last_only`, only `logit_rows` when given)."""
        x = self.transformer.embedding.word_embeddings(input_ids)
        # Angles in fp32, then cos/sin in the model dtype, as the reference does.
        angles = positions[..., None].float() * self.inv_freq  # [B, T, R/2]
        cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)
        fused = fused_glm_layers(self, x, cos, sin, cache)  # None unless a native paged step
        if fused is not None:
            x = fused
        else:
            for i, layer in enumerate(self.transformer.encoder.layers):
                x = layer(x, cos, sin, i, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if last_only:
            x = x[:, -1:]
        elif logit_rows is not None:
            x = x[:, logit_rows]
        norm = self.transformer.encoder.final_layernorm
        # the final RMSNorm fused into a quantized head's GEMV (a LayerNorm has a mean and a bias: not there)
        head = getattr(self.transformer.output_layer, "native_forward", None) if isinstance(norm, RMSNorm) else None
        logits = None if head is None else head(x.reshape(-1, x.shape[-1]), norm=norm)
        if logits is not None:  # (the vocabulary size spelled out: a step may sample no row at all)
            return logits.view(*x.shape[:-1], logits.shape[-1])
        return self.transformer.output_layer(norm(x))

    # ---- checkpoint formats -------------------------------------------------------------------------

    @staticmethod
    def hf_tensor_name(name: str) -> str | None:
        """THUDM names are ours; transformers' names (GlmForCausalLM / Glm4ForCausalLM) are mapped."""
        if name.endswith("rotary_pos_emb.inv_freq"):
            return None  # a cache the reference saves; recomputed
        if name in _HF_TOP_NAMES:
            return _HF_TOP_NAMES[name]
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            ours, piece = _HF_LAYER_MODULES.get(module, (module, ""))
            return f"transformer.encoder.layers.{index}.{ours}.{kind}" + (f"#{piece}" if piece else "")
        return name

    @staticmethod
    def gguf_tensor_name(name: str) -> str | None:
        if name in _GGUF_TOP_NAMES:
            return _GGUF_TOP_NAMES[name]
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            module, _, kind = rest.rpartition(".")
            if module in _GGUF_LAYER_MODULES:
                ours, piece = _GGUF_LAYER_MODULES[module]
                return f"transformer.encoder.layers.{index}.{ours}.{kind}" + (f"#{piece}" if piece else "")
        if name == "rope_freqs.weight":
            return None
        return name  # unknown names surface as "unexpected tensor" warnings in the loader

    def from_gguf_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # No q/k row permutation to undo: llama.cpp's ChatGLMModel converter writes the weights as they are,
        # and its chatglm/glm4 graphs use ROPE_TYPE_NORM (adjacent pairs), i.e. the checkpoint's own layout.
        return tensor

    def join_pieces(self, name: str, pieces: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Fuse split q/k/v (transformers / GGUF attn_q, attn_k, attn_v) into our query_key_value rows."""
        if not all(p in pieces for p in "qkv"):
            return None
        return torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0)


# transformers' layout (GlmForCausalLM, Glm4ForCausalLM) -> ours; "#q" etc. marks a piece (loading.py).
_HF_TOP_NAMES = {
    "model.embed_tokens.weight": "transformer.embedding.word_embeddings.weight",
    "model.norm.weight": "transformer.encoder.final_layernorm.weight",
    "lm_head.weight": "transformer.output_layer.weight",
}
_HF_LAYER_MODULES = {
    "self_attn.q_proj": ("self_attention.query_key_value", "q"),
    "self_attn.k_proj": ("self_attention.query_key_value", "k"),
    "self_attn.v_proj": ("self_attention.query_key_value", "v"),
    "self_attn.o_proj": ("self_attention.dense", ""),
    "mlp.gate_up_proj": ("mlp.dense_h_to_4h", ""),  # same fused [gate; up] rows
    "mlp.down_proj": ("mlp.dense_4h_to_h", ""),
    # input_layernorm, post_attention_layernorm and GLM-4-0414's post_self_attn_layernorm /
    # post_mlp_layernorm keep their names.
}

# llama.cpp arch "chatglm" / "glm4" -> ours.
_GGUF_TOP_NAMES = {
    "token_embd.weight": "transformer.embedding.word_embeddings.weight",
    "output_norm.weight": "transformer.encoder.final_layernorm.weight",
    "output.weight": "transformer.output_layer.weight",
}
_GGUF_LAYER_MODULES = {
    "attn_norm": ("input_layernorm", ""),
    "attn_qkv": ("self_attention.query_key_value", ""),
    "attn_q": ("self_attention.query_key_value", "q"),  # converted from GlmForCausalLM / Glm4ForCausalLM
    "attn_k": ("self_attention.query_key_value", "k"),
    "attn_v": ("self_attention.query_key_value", "v"),
    "attn_output": ("self_attention.dense", ""),
    "ffn_norm": ("post_attention_layernorm", ""),
    # fused gate|up rows: llama.cpp's LLM_FFN_SWIGLU takes the first half as the gate, as we do
    "ffn_up": ("mlp.dense_h_to_4h", ""),
    "ffn_down": ("mlp.dense_4h_to_h", ""),
    "post_attention_norm": ("post_self_attn_layernorm", ""),  # glm4 (0414) sandwich norms
    "post_ffw_norm": ("post_mlp_layernorm", ""),
}


Model = ChatGLMForCausalLM


# ---- tokenizer and chat format: the hooks `api.load` looks for ------------------------------------------


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    return load_glm_checkpoint_tokenizer(ckpt)


def chat_format_for(tokenizer: Tokenizer, config: ChatGLMConfig) -> ChatFormat:
    # ChatGLM2, ChatGLM3 and GLM-4-9B-chat share this network; their prompt formats differ, and only the
    # tokenizer's special tokens tell which one this is.
    return glm_chat_format_for_model(tokenizer, config)
