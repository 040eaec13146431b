"""ChatGLM-6B, the first GLM chat model (GLM-130B style block; spec section 1).

Nothing like a Llama block, and every difference changes the logits:
- fused q/k/v interleaved *per head* (each head's 3·d rows are q|k|v), all linears biased, LayerNorm;
- 2-D rotary: the first half of each head rotates with the token's position, the second half with its
  "block position" (both NeoX rotate-half within their half);
- a DeepNorm-like residual that adds the sublayer to the *normalised* input scaled by α = √56;
- GeLU(tanh) MLP without gating.

The prompt ends in `[gMASK] <sop>`; everything before `<sop>` is a bidirectional prefix. Positions are
derived here from where `[gMASK]`/`<sop>` sit, so callers pass plain absolute indices like for any model.
The whole prompt must arrive in one forward (`prefill_chunk = None`): a chunk cannot attend to prefix tokens
that come after it. For the same reason a KV cache is never reusable across chat turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.chat_format import ChatFormat, glm_chat_format_for_model
from glmstack.engine.errors import UnsupportedArchitectureError
from glmstack.engine.kv_cache import DenseKVCache
from glmstack.engine.models.layers import apply_rotary
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.glm import load_glm_checkpoint_tokenizer

if TYPE_CHECKING:
    from glmstack.engine.loading.checkpoint import Checkpoint

# GLMBlock(num_layers=28) is a constructor default the reference never overrides: every ChatGLM-6B-shaped
# model, whatever its depth, uses sqrt(2 * 28).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


@dataclass
class ChatGLMv1Config:
    vocab_size: int
    hidden_size: int
    inner_hidden_size: int
    num_layers: int
    num_heads: int
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    sop_token_id: int = 130004  # bos_token_id: `<sop>` starts the generated block
    gmask_token_id: int = 130001
    mask_token_id: int = 130000
    # lm_head.weight holds the embedding's values (transformers ties them for this model); keep one copy.
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ChatGLMv1Config:
        if not cfg.get("position_encoding_2d", True):
            raise UnsupportedArchitectureError(
                "ChatGLM-6B config with position_encoding_2d=false is not supported"
            )
        if cfg.get("quantization_bit"):
            raise UnsupportedArchitectureError(
                f"pre-quantized ChatGLM-6B checkpoints (quantization_bit={cfg['quantization_bit']}) are not "
                "supported; load the fp16 checkpoint instead"
            )
        hidden = cfg["hidden_size"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            inner_hidden_size=cfg.get("inner_hidden_size") or 4 * hidden,
            num_layers=cfg["num_layers"],
            num_heads=cfg["num_attention_heads"],
            layernorm_epsilon=cfg.get("layernorm_epsilon", 1e-5),
            max_sequence_length=cfg.get("max_sequence_length", 2048),
            sop_token_id=cfg.get("bos_token_id", 130004),
            gmask_token_id=cfg.get("gmask_token_id", 130001),
            mask_token_id=cfg.get("mask_token_id", 130000),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # plain multi-head attention

    @property
    def context_length(self) -> int:
        return self.max_sequence_length


def rope_inv_freq(config: ChatGLMv1Config) -> torch.Tensor:
    """Frequencies for one 2-D half (head_dim / 2 dims). The reference rounds them to fp16 (`.half()`) even
    for an fp32 model, and the model was trained with those values."""
    dim = config.head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return inv_freq.half().float()


def prompt_layout(input_ids: torch.Tensor, config: ChatGLMv1Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (index of `<sop>`, index of `[gMASK]`) — the prefix length and the position every generated
    token shares. `[MASK]` stands in when there is no `[gMASK]` (the reference's rule). A row without
    `<sop>` is all prefix; one without either mask token uses the token just before `<sop>`."""
    seqlen = input_ids.shape[1]
    index = torch.arange(seqlen, device=input_ids.device)

    def first(token_id: int) -> torch.Tensor:
        return torch.where(input_ids == token_id, index, seqlen).min(dim=-1).values

    prefix = first(config.sop_token_id)
    gmask, mask = first(config.gmask_token_id), first(config.mask_token_id)
    mask_position = torch.where(
        gmask < seqlen, gmask, torch.where(mask < seqlen, mask, (prefix - 1).clamp(min=0))
    )
    return prefix, mask_position


def positions_2d(
    positions: torch.Tensor, prefix: torch.Tensor, mask_position: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec 1.3: prefix tokens count 0, 1, 2, ... with block position 0; from `<sop>` on, every token sits at
    the mask's position and counts up in block position (`<sop>` = 1, first generated token = 2, ...)."""
    in_prefix = positions < prefix[:, None]
    position = torch.where(in_prefix, positions, mask_position[:, None])
    block_position = torch.where(in_prefix, 0, positions - prefix[:, None] + 1)
    return position, block_position


def prefix_mask(positions: torch.Tensor, prefix: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [B, 1, T, total], True = may attend: causal, except that every token sees the whole prefix
    (everything before `<sop>`, the `[gMASK]` included)."""
    keys = torch.arange(total, device=positions.device)
    allowed = (keys[None, None, :] <= positions[:, :, None]) | (keys[None, None, :] < prefix[:, None, None])
    return allowed[:, None]


def rotate_2d(x: torch.Tensor, rotary: list[torch.Tensor]) -> torch.Tensor:
    """First half of each head by position, second half by block position. rotary: cos1, sin1, cos2, sin2."""
    half = x.shape[-1] // 2
    cos1, sin1, cos2, sin2 = rotary
    return torch.cat(
        (apply_rotary(x[..., :half], cos1, sin1), apply_rotary(x[..., half:], cos2, sin2)), dim=-1
    )


class Attention(nn.Module):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rotary: list[torch.Tensor],
        layer: int,
        cache: DenseKVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # Rows are grouped per head: head j owns rows 3dj..3d(j+1), as q | k | v (spec 1.2).
        qkv = self.query_key_value(x).view(bsz, seqlen, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = rotate_2d(q, rotary), rotate_2d(k, rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # The reference's 1/(i+1) query scaling and ×(i+1) before an fp32 softmax cancel out: plain 1/√d.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))  # named GLU, not gated


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: list[torch.Tensor],
        layer: int,
        cache: DenseKVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        # The residual branch carries the *normalised* input, scaled by alpha (DeepNorm-like).
        h = self.input_layernorm(x)
        x = h * RESIDUAL_ALPHA + self.attention(h, rotary, layer, cache, mask)
        h = self.post_attention_layernorm(x)
        return h * RESIDUAL_ALPHA + self.mlp(h)


class Transformer(nn.Module):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLMv1ForCausalLM(nn.Module):
    config_class = ChatGLMv1Config
    # The bidirectional prefix needs the whole prompt in one forward; generation must not chunk the prefill.
    # The batched paged engine cannot express v1's per-sequence bidirectional prefix; the async engine
    # serves v1 through the one-sequence reference loop instead.
    supports_paged = False
    prefill_chunk: int | None = None

    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DenseKVCache | None = None,
        last_only: bool = False,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: [B, T], positions being plain token indices. The first forward on a sequence
        must hold the whole prompt (through `<sop>`); its layout is remembered on the cache for decoding.
        Logits [B, T, V]; only the last position with `last_only`, only `logit_rows` when given."""
        seqlen = input_ids.shape[1]
        if cache is None or cache.length == 0:
            prefix, mask_position = prompt_layout(input_ids, self.config)
            if cache is not None:
                cache.model_state["prompt_layout"] = prefix, mask_position
        else:
            prefix, mask_position = cache.model_state["prompt_layout"]
        x = self.transformer.word_embeddings(input_ids)
        rotary = self._rotary(positions_2d(positions, prefix, mask_position), x.dtype)
        past = cache.length if cache is not None else 0
        mask = prefix_mask(positions, prefix, past + seqlen) if seqlen > 1 else None
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, rotary, i, cache, mask)
        if cache is not None:
            cache.advance(seqlen)
        if last_only:
            x = x[:, -1:]
        elif logit_rows is not None:
            x = x[:, logit_rows]
        return self.lm_head(self.transformer.final_layernorm(x))

    def _rotary(self, streams: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """cos/sin [B, 1, T, d/2] for the position and the block-position halves."""
        out = []
        for pos in streams:
            angles = pos[..., None].float() * self.inv_freq
            if dtype == torch.float16:  # the fp16 reference multiplies in fp16: reproduce its rounding
                angles = angles.half().float()
            emb = torch.cat((angles, angles), dim=-1)[:, None]
            out += [emb.cos().to(dtype), emb.sin().to(dtype)]
        return out

    # ---- checkpoint formats -------------------------------------------------------------------------

    @staticmethod
    def hf_tensor_name(name: str) -> str | None:
        """Checkpoint names are ours; the saved rotary inv_freq is ignored by the reference too."""
        return None if name.endswith("rotary_emb.inv_freq") else name


Model = ChatGLMv1ForCausalLM


# ---- tokenizer and chat format: the hooks `api.load` looks for ------------------------------------------


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    return load_glm_checkpoint_tokenizer(ckpt)  # ice_text.model, with its id offset from config.json


def chat_format_for(tokenizer: Tokenizer, config: ChatGLMv1Config) -> ChatFormat:
    return glm_chat_format_for_model(tokenizer, config)
