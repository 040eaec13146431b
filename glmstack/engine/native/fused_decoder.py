"""A decoder's paged serving step as native calls, for the Llama and GLM families. Per layer: RMSNorm + qkv,
attention, o + residual, RMSNorm + gate_up, SiLU·mul + down + residual, each one call of kernels.cpp,
instead of dozens of small ATen ops. Attention is one native call for every row of the step, decoding and
prompt rows alike: rotary, the KV write, and each row's attention over its own paged context
(`PagedAttentionBatch.attention_rows`).

What a family changes is its plan (`DecoderPlan`), built once per model from its modules:
- Llama (and Qwen2, Mistral...): rotate-half rotary over the whole head.
- GLM (ChatGLM2/3, GLM-4-9B-chat `GLMBlock`; GLM-4-0414 `Glm4Block`): rotary on adjacent pairs of each
  head's first `rotary_dim` dims (the kernel's `interleaved_rotary_dim`), so the KV cache holds what the
  module path (`apply_interleaved_rotary`) writes, whichever path computed a step. GLM-4-0414's sandwich
  norms apply to the attention and MLP outputs before they join the residual, so for those layers o and down
  run without the fused residual and `rms_norm_add` does norm + add.
Models with a LayerNorm (`rmsnorm: false`), a head size the native attention can't take (not a multiple of
16) or any linear the kernels can't run (unquantized, or on another device) keep the module path.

Every step of a paged batch takes this path when the model's linears are native, so each token is computed
the same way whatever shares its step: the projections are row-independent on the kernels' VNNI path, and a
row's attention is computed alone over its own context. A greedy request then answers the same cold,
prefix-cached, or inside a batch of 16 (tests/test_same_answer.py, tests/test_fused_glm.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from glmstack.engine import native
from glmstack.engine.kv_cache import AttentionCache, PagedAttentionBatch
from glmstack.engine.models.layers import RMSNorm
from glmstack.engine.quant.int4 import INT4_NATIVE_MAX_ROWS, Int4Linear
from glmstack.engine.quant.linear_base import NATIVE_DTYPES, NATIVE_MAX_ROWS, NativeLinear

if TYPE_CHECKING:
    from glmstack.engine.models.chatglm import ChatGLMForCausalLM
    from glmstack.engine.models.llama import LlamaForCausalLM

Norm = tuple[torch.Tensor, float]  # an RMSNorm's (weight, eps), as the kernels take them

# Set in a model's __dict__ for a serving step with a LoRA row (engine/adapters/lora.py `lora_step`): projection
# module -> [(token rows, its LoRA share)]. The module path adds those deltas by hooks around the modules' calls;
# the kernel calls here bypass the hooks, so this path adds them itself, to the rows that have them only - a
# base row computes exactly as in a step without adapters. (A step with a P-Tuning row takes the module path:
# `has_prefixes`.)
ADAPTER_STEP = "_glmstack_adapter_step"
LoRAShares = dict[Any, list[tuple[torch.Tensor, Any]]]


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: its norms as (weight, eps) and its projections' `NativeLinear.native_args`
    (kernel, weight, scales, bias). `attn_out_norm` / `mlp_out_norm`: GLM-4-0414's norms on the attention
    and MLP outputs (None: the output joins the residual as it is)."""

    attn_norm: Norm
    qkv: tuple
    o: tuple
    mlp_norm: Norm
    gate_up: tuple
    down: tuple
    attn_out_norm: Norm | None
    mlp_out_norm: Norm | None
    int4: bool  # some projection is int4 (its fp32-activation kernel takes fewer rows)
    modules: tuple[Any, ...] = ()  # the projection modules [qkv, o, gate_up, down]: what LoRA shares are keyed by


@dataclass(frozen=True)
class DecoderPlan:
    layers: list[LayerPlan]
    heads: int
    kv_heads: int
    head_dim: int
    interleaved_rotary_dim: int  # 0: rotate-half over the whole head (Llama); n: GLM's pairs of n dims

    @property
    def max_rows(self) -> int:
        """The most rows the fp32-activation kernels take (the VNNI path takes any)."""
        return INT4_NATIVE_MAX_ROWS if any(layer.int4 for layer in self.layers) else NATIVE_MAX_ROWS


def _layer_plan(norms: list[Any], projections: list[Any]) -> LayerPlan | None:
    """norms: [attention, MLP, attention output, MLP output] (the last two None where the layer has none);
    projections: [qkv, o, gate_up, down]. None unless every norm is an RMSNorm (a LayerNorm has a mean and a
    bias) and every projection a quantized linear our kernels take (`native_ready`)."""
    attn_norm, mlp_norm, attn_out_norm, mlp_out_norm = norms
    if not (isinstance(attn_norm, RMSNorm) and isinstance(mlp_norm, RMSNorm)):
        return None
    if not all(m is None or isinstance(m, RMSNorm) for m in (attn_out_norm, mlp_out_norm)):
        return None
    if not all(isinstance(m, NativeLinear) and m.native_ready(torch.empty(1, m.in_features)) for m in projections):
        return None
    qkv, o, gate_up, down = (m.native_args() for m in projections)
    return LayerPlan((attn_norm.weight, attn_norm.eps), qkv, o, (mlp_norm.weight, mlp_norm.eps), gate_up, down,
                     None if attn_out_norm is None else (attn_out_norm.weight, attn_out_norm.eps),
                     None if mlp_out_norm is None else (mlp_out_norm.weight, mlp_out_norm.eps),
                     any(isinstance(m, Int4Linear) for m in projections), tuple(projections))


def _every_layer(layers: list[LayerPlan | None]) -> list[LayerPlan] | None:
    planned = [layer for layer in layers if layer is not None]
    return planned if len(planned) == len(layers) else None


def _llama_plan(model: LlamaForCausalLM) -> DecoderPlan | None:
    cfg = model.config
    decoder_layers: list[Any] = list(model.model.layers)  # DecoderLayers (a ModuleList types its items as Module)
    layers = _every_layer([
        _layer_plan([layer.input_layernorm, layer.post_attention_layernorm, None, None],
                    [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj])
        for layer in decoder_layers
    ])
    return None if layers is None else DecoderPlan(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 0)


def _glm_plan(model: ChatGLMForCausalLM) -> DecoderPlan | None:
    """GLMBlock, and Glm4Block with its post_self_attn_layernorm / post_mlp_layernorm."""
    cfg = model.config
    if cfg.rotary_dim % 2 or cfg.rotary_dim > cfg.head_dim:
        return None
    plans: list[LayerPlan | None] = []
    blocks: list[Any] = list(model.transformer.encoder.layers)  # GLMBlocks / Glm4Blocks
    for block in blocks:
        attn, mlp = block.self_attention, block.mlp
        norms = [block.input_layernorm, block.post_attention_layernorm,
                 getattr(block, "post_self_attn_layernorm", None), getattr(block, "post_mlp_layernorm", None)]
        plans.append(_layer_plan(norms, [attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]))
    layers = _every_layer(plans)
    return None if layers is None else DecoderPlan(layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                   cfg.rotary_dim)


def _plan(model: nn.Module, build: Callable[[Any], DecoderPlan | None], dtype: torch.dtype) -> DecoderPlan | None:
    """`build(model)`, cached per quantization state and model dtype: quantizing replaces the linears the plan
    holds, and a dtype change (`.half()`, `.float()`) replaces their scale buffers."""
    key = (getattr(model, "quantization", None), dtype)
    cached = model.__dict__.get("_native_plan_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = build(model)
    model.__dict__["_native_plan_cache"] = (key, plan)
    return plan


def fused_llama_layers(model: LlamaForCausalLM, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       cache: AttentionCache | None) -> torch.Tensor | None:
    """All decoder layers of a Llama-family `model` for one paged serving step, natively; x: [1, N, hidden]
    (decoding rows first, then prompt chunks, as `PagedAttentionBatch` orders them), cos/sin as the model
    computed them ([1, N, 1, head_dim]). None (the caller runs the modules) unless the kernels, the weights
    and the step all fit."""
    return _fused_layers(model, _llama_plan, x, cos, sin, cache)


def fused_glm_layers(model: ChatGLMForCausalLM, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     cache: AttentionCache | None) -> torch.Tensor | None:
    """`fused_llama_layers` for a GLM-family model (chatglm.py, glm4.py); cos/sin [1, 1, N, rotary_dim / 2]
    as its forward computes them."""
    return _fused_layers(model, _glm_plan, x, cos, sin, cache)


def _fused_layers(model: nn.Module, build: Callable[[Any], DecoderPlan | None], x: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, cache: AttentionCache | None) -> torch.Tensor | None:
    if not isinstance(cache, PagedAttentionBatch) or cache.has_prefixes:
        return None
    if x.dim() != 3 or x.shape[0] != 1 or x.dtype not in NATIVE_DTYPES or not x.is_cpu:
        return None
    n = x.shape[1]
    kv = cache.kv
    if kv.keys[0].dtype != x.dtype or kv.values[0].dtype != x.dtype:
        return None
    nk = native.kernels()
    plan = _plan(model, build, x.dtype) if nk is not None else None
    if nk is None or plan is None:
        return None
    if n > plan.max_rows and not native.vnni_rows():
        return None  # the fp32-activation kernels are GEMVs: a prompt goes the modules' way (dequantize + GEMM)
    if plan.head_dim % 16 or kv.values[0].shape[-1] % 16:
        return None  # the native attention takes whole vectors of 16 per head
    heads, kv_heads, scale = plan.heads, plan.kv_heads, 1.0 / math.sqrt(plan.head_dim)
    c, s = cos.reshape(n, -1).to(x.dtype).contiguous(), sin.reshape(n, -1).to(x.dtype).contiguous()
    gather, row_seq, lengths = cache.attention_rows()
    lora: LoRAShares | None = model.__dict__.get(ADAPTER_STEP)
    h = x[0].contiguous()
    for i, layer in enumerate(plan.layers):
        cache.raise_if_cancelled()
        (qkv, *qkv_w), (o, *o_w), (gate_up, *gu_w), (down, *down_w) = layer.qkv, layer.o, layer.gate_up, layer.down
        m_qkv, m_o, m_gate_up, m_down = layer.modules
        projected = qkv(h, *qkv_w, *layer.attn_norm, False, None)
        if lora is not None:
            _add_lora(lora, m_qkv, projected, _rms_rows, h, layer.attn_norm)
        a = nk.paged_attention(projected, c, s, kv.keys[i], kv.values[i], cache.slots, gather, lengths, heads,
                                kv_heads, scale, row_seq, plan.interleaved_rotary_dim)
        # o and down: a LoRA delta is added after the kernel's residual epilogue (or before a sandwich norm), so
        # every row's kernel calls stay those of a step without adapters
        if layer.attn_out_norm is None:
            h = o(a, *o_w, None, 0.0, False, h)  # + residual, in the kernel's epilogue
            if lora is not None:
                _add_lora(lora, m_o, h, _rows, a)
        else:
            out = o(a, *o_w, None, 0.0, False, None)
            if lora is not None:
                _add_lora(lora, m_o, out, _rows, a)
            h = nk.rms_norm_add(out, *layer.attn_out_norm, h)
        up = gate_up(h, *gu_w, *layer.mlp_norm, False, None)
        if lora is not None:
            _add_lora(lora, m_gate_up, up, _rms_rows, h, layer.mlp_norm)
        if layer.mlp_out_norm is None:
            h = down(up, *down_w, None, 0.0, True, h)
            if lora is not None:
                _add_lora(lora, m_down, h, _silu_mul_rows, up)
        else:
            out = down(up, *down_w, None, 0.0, True, None)
            if lora is not None:
                _add_lora(lora, m_down, out, _silu_mul_rows, up)
            h = nk.rms_norm_add(out, *layer.mlp_out_norm, h)
    return h[None]


def _add_lora(lora: LoRAShares, module: Any, out: torch.Tensor, inputs: Callable[..., torch.Tensor],
              *args: Any) -> None:
    """out[rows] += each adapter's delta for `module`, from `inputs(rows, *args)`: the module's input on those
    rows, which the kernels compute inside their calls (normed, or silu(gate)·up) and so is recomputed here."""
    for rows, share in lora.get(module, ()):
        out.index_add_(0, rows, share.delta(inputs(rows, *args)))


def _rows(rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, rows)


def _rms_rows(rows: torch.Tensor, h: torch.Tensor, norm: Norm) -> torch.Tensor:
    return torch.nn.functional.rms_norm(h.index_select(0, rows), (h.shape[-1],), norm[0], norm[1])


def _silu_mul_rows(rows: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, value = up.index_select(0, rows).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * value
