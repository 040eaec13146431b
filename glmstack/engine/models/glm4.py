"""GLM-4-9B-0414 / GLM-4-32B-0414 / GLM-Z1 (`Glm4ForCausalLM`, spec section 4).

The v2 network of chatglm.py (fused q/k/v, partial adjacent-pair rotary, fused SwiGLU) with two extra
RMSNorms per layer, applied to each sublayer's *output* before it joins the residual ("sandwich" norms).
Naming trap kept from the checkpoints: `post_attention_layernorm` is the pre-MLP norm (Llama naming); the
norm on the attention output is `post_self_attn_layernorm`.

Checkpoints come in transformers' layout (q/k/v_proj, gate_up_proj); chatglm.py's name mapping turns them
into our THUDM-style names, which is also what the 0414 originals used. GGUF: llama.cpp arch "glm4".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from glmstack.engine.chat_format import ChatFormat, GLM4ChatFormat, TemplateChatFormat
from glmstack.engine.chat_format.glm4 import STOP_TOKENS
from glmstack.engine.kv_cache import AttentionCache
from glmstack.engine.models.chatglm import ChatGLMConfig, ChatGLMForCausalLM, GLMBlock, make_norm
from glmstack.engine.tokenization.base import Tokenizer
from glmstack.engine.tokenization.glm import load_glm_checkpoint_tokenizer

if TYPE_CHECKING:
    from glmstack.engine.loading.checkpoint import Checkpoint


class Glm4Block(GLMBlock):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.post_self_attn_layernorm = make_norm(config)
        self.post_mlp_layernorm = make_norm(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        cache: AttentionCache | None,
    ) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x), cos, sin, layer, cache)
        x = x + self.post_self_attn_layernorm(attn)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(ChatGLMForCausalLM):
    block_class = Glm4Block


Model = Glm4ForCausalLM


# ---- tokenizer and chat format: the hooks `api.load` looks for ------------------------------------------


def load_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    return load_glm_checkpoint_tokenizer(ckpt)  # tokenizer.json for 0414 checkpoints, GGUF metadata for .gguf


def chat_format_for(tokenizer: Tokenizer, config: ChatGLMConfig) -> ChatFormat:
    """The model's own chat template: 0414's differs from GLM-4-9B-chat's (system messages first, its own tools
    block), so the built-in GLM-4 format is only the fallback for a checkpoint without one.

    The template writes no end-of-turn token and tokenizer_config.json names only `<|endoftext|>` as eos, but
    the model ends a turn with `<|user|>` or `<|observation|>` (generation_config.json lists all three):
    without them here it would go on to write the user's next turn itself.

    Tool calls and reasoning follow from the template (template.py): its GLM-4 tools block selects
    `GLM4Dialect`, and GLM-Z1's generation prompt, which opens `<think>`, makes replies start as reasoning."""
    if not tokenizer.chat_template:
        return GLM4ChatFormat(tokenizer)
    chat_format = TemplateChatFormat(tokenizer)
    stop_ids = (tokenizer.token_to_id(token) for token in STOP_TOKENS)
    chat_format.stop_token_ids |= {token_id for token_id in stop_ids if token_id is not None}
    return chat_format
