"""GLM-4-9B-0414 / GLM-4-32B-0414 / GLM-Z1 (`Glm4ForCausalLM`, spec section 4).

The v2 network of chatglm.py (fused q/k/v, partial adjacent-pair rotary, fused SwiGLU) with two extra
RMSNorms per layer, applied to each sublayer's *output* before it joins the residual ("sandwich" norms).
Naming trap kept from the checkpoints: `post_attention_layernorm` is the pre-MLP norm (Llama naming); the
norm on the attention output is `post_self_attn_layernorm`.

Checkpoints come in transformers' layout (q/k/v_proj, gate_up_proj); chatglm.py's name mapping turns them
into our THUDM-style names, which is also what the 0414 originals used. GGUF: llama.cpp arch "glm4".
"""

from __future__ import annotations

import torch

from glmstack.engine.kv_cache import DenseKVCache
from glmstack.engine.models.chatglm import ChatGLMConfig, ChatGLMForCausalLM, GLMBlock, make_norm


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
        cache: DenseKVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x), cos, sin, layer, cache, mask)
        x = x + self.post_self_attn_layernorm(attn)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class Glm4ForCausalLM(ChatGLMForCausalLM):
    block_class = Glm4Block


Model = Glm4ForCausalLM
