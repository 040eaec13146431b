"""A Llama decoder's serving step as native calls. Per layer: RMSNorm + qkv, attention, o + residual,
RMSNorm + gate_up, SiLU·mul + down + residual, each one call of kernels.cpp, instead of dozens of small ATen
ops. Attention is one native call for every row of the step, decoding and prompt rows alike: rotary, the KV
write, and each row's attention over its own paged context (`PagedAttentionBatch.attention_rows`).

Every step of a paged batch takes this path when the model's linears are native, so each token is computed
the same way whatever shares its step: the projections are row-independent on the kernels' VNNI path, and a
row's attention is computed alone over its own context. A greedy request then answers the same cold,
prefix-cached, or inside a batch of 16 (tests/test_same_answer.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from glmstack.engine import native
from glmstack.engine.kv_cache import AttentionCache, PagedAttentionBatch
from glmstack.engine.quant.int4 import INT4_NATIVE_MAX_ROWS, Int4Linear
from glmstack.engine.quant.linear_base import NATIVE_DTYPES, NATIVE_MAX_ROWS, NativeLinear

if TYPE_CHECKING:
    from glmstack.engine.models.llama import DecoderLayer, LlamaForCausalLM


def _native_plan(model: LlamaForCausalLM) -> tuple[list[tuple], int] | None:
    """Per layer: the input norm's (weight, eps), the qkv / o / gate_up / down projections' native arguments
    (`native_args`) and the post-attention norm's (weight, eps) — when every projection is a quantized linear
    our native kernels take (`native_ready`), else None; with the most rows the fp32-activation path takes
    (the VNNI path takes any). Cached per quantization state."""
    key = getattr(model, "quantization", None)
    cached = model.__dict__.get("_native_plan_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan: list[tuple] = []
    max_rows = NATIVE_MAX_ROWS
    layers: list[DecoderLayer] = list(model.model.layers)  # type: ignore[arg-type]  # a ModuleList of them
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears: list[Any] = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if not all(isinstance(m, NativeLinear) and m.native_ready(torch.empty(1, m.in_features)) for m in linears):
            model.__dict__["_native_plan_cache"] = (key, None)
            return None
        if any(isinstance(m, Int4Linear) for m in linears):
            max_rows = min(max_rows, INT4_NATIVE_MAX_ROWS)
        qkv, o, gate_up, down = (m.native_args() for m in linears)
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        plan.append((norm1.weight, norm1.eps, qkv, o, norm2.weight, norm2.eps, gate_up, down))
    result = (plan, max_rows)
    model.__dict__["_native_plan_cache"] = (key, result)
    return result


def fused_llama_layers(model: LlamaForCausalLM, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       cache: AttentionCache | None) -> torch.Tensor | None:
    """All decoder layers of `model` for one paged serving step, natively; x: [1, N, hidden] (decoding rows
    first, then prompt chunks, as `PagedAttentionBatch` orders them), cos/sin as the model computed them.
    None (the caller runs the modules) unless the kernels, the weights and the step all fit."""
    if not isinstance(cache, PagedAttentionBatch):
        return None
    if x.dim() != 3 or x.shape[0] != 1 or x.dtype not in NATIVE_DTYPES or not x.is_cpu:
        return None
    n = x.shape[1]
    kv = cache.kv
    if kv.keys[0].dtype != x.dtype or kv.values[0].dtype != x.dtype:
        return None
    nk = native.kernels()
    planned = _native_plan(model) if nk is not None else None
    if nk is None or planned is None:
        return None
    if n > planned[1] and not native.vnni_rows():
        return None  # the fp32-activation kernels are GEMVs: a prompt goes the modules' way (dequantize + GEMM)
    plan = planned[0]
    cfg = model.config
    if cfg.head_dim % 16:
        return None  # the native attention takes whole vectors of 16 per head
    heads, kv_heads, scale = cfg.num_heads, cfg.num_kv_heads, 1.0 / math.sqrt(cfg.head_dim)
    c, s = cos.reshape(n, -1).to(x.dtype).contiguous(), sin.reshape(n, -1).to(x.dtype).contiguous()
    gather, row_seq, lengths = cache.attention_rows()
    h = x[0].contiguous()
    for i, (w1, eps1, (qkv, *qkv_w), (o, *o_w), w2, eps2, (gate_up, *gu_w), (down, *down_w)) in enumerate(plan):
        cache.raise_if_cancelled()
        projected = qkv(h, *qkv_w, w1, eps1, False, None)
        a = nk.paged_attention(projected, c, s, kv.keys[i], kv.values[i], cache.slots, gather, lengths, heads,
                                kv_heads, scale, row_seq)
        h = o(a.contiguous(), *o_w, None, 0.0, False, h)
        h = down(gate_up(h, *gu_w, w2, eps2, False, None), *down_w, None, 0.0, True, h)
    return h[None]
