"""Where each linear of the transformers model of an architecture lives in ours.

Adapters (LoRA in the PEFT format) name the modules of the Hugging Face model they were trained on:
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Our models fuse some of those linears into
one matmul (llama.py: `qkv_proj` = [q | k | v] rows, `gate_up_proj` = [gate | up]; chatglm.py keeps THUDM's
own fused `query_key_value` / `dense_h_to_4h`, which are what THUDM's modelling names too), so an HF linear is
a module path of ours plus the rows of its output that the HF linear produces. Training (finetune/lora.py)
and serving adapters both read this one table, so the two cannot disagree about a name.

Which HF model an architecture's adapters name:
- llama.py: transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (q/k/v/o_proj,
  gate/up/down_proj);
- chatglm.py: THUDM's remote-code ChatGLMForConditionalGeneration (the names are ours already:
  `transformer.encoder.layers.N.self_attention.query_key_value`, ...), what ChatGLM2/3 and GLM-4-9B-chat
  adapters from THUDM's finetune demos and LLaMA-Factory name;
- glm4.py: transformers' Glm4ForCausalLM (`model.layers.N.self_attn.q_proj`, `mlp.gate_up_proj`, ...), the
  layout GLM-4-0414 checkpoints ship in.
Rows come from the config, not from weight shapes, so quantized linears map the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from glmstack.engine.models.chatglm import ChatGLMConfig, ChatGLMForCausalLM
from glmstack.engine.models.glm4 import Glm4ForCausalLM
from glmstack.engine.models.llama import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class Target:
    module: str  # the engine model's module path, e.g. "model.layers.3.self_attn.qkv_proj"
    rows: slice  # the rows of that (possibly fused) linear's output the HF module produces


class UnsupportedAdapterModel(ValueError):
    """This architecture has no HF-name mapping (so no LoRA adapters)."""


def hf_linear_targets(model: nn.Module) -> dict[str, Target]:
    """Every linear of the transformers model of this architecture, by its HF module path
    ("model.layers.3.self_attn.q_proj"), -> where it lives in the engine's model. The output head is
    included (`lm_head`, or `transformer.output_layer` for THUDM's ChatGLM): some adapters train it."""
    if isinstance(model, Glm4ForCausalLM):  # before ChatGLMForCausalLM: it is a subclass
        return _glm4_targets(model.config)
    if isinstance(model, ChatGLMForCausalLM):
        return _chatglm_targets(model.config)
    if isinstance(model, LlamaForCausalLM):
        return _llama_targets(model.config)
    raise UnsupportedAdapterModel(f"{type(model).__name__} has no adapter name mapping")


def _split(module: str, pieces: list[tuple[str, int]]) -> dict[str, Target]:
    """HF paths of consecutive row blocks of one fused linear: [(hf_path, rows), ...] in row order."""
    targets, start = {}, 0
    for hf_path, rows in pieces:
        targets[hf_path] = Target(module, slice(start, start + rows))
        start += rows
    return targets


def _whole(module: str, rows: int) -> Target:
    return Target(module, slice(0, rows))


def _llama_targets(cfg: LlamaConfig) -> dict[str, Target]:
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    inner, hidden = cfg.intermediate_size, cfg.hidden_size
    targets: dict[str, Target] = {}
    for i in range(cfg.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        targets |= _split(f"{attn}.qkv_proj",
                          [(f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows), (f"{attn}.v_proj", kv_rows)])
        targets[f"{attn}.o_proj"] = _whole(f"{attn}.o_proj", hidden)
        targets |= _split(f"{mlp}.gate_up_proj", [(f"{mlp}.gate_proj", inner), (f"{mlp}.up_proj", inner)])
        targets[f"{mlp}.down_proj"] = _whole(f"{mlp}.down_proj", hidden)
    targets["lm_head"] = _whole("lm_head", cfg.vocab_size)
    return targets


def _chatglm_targets(cfg: ChatGLMConfig) -> dict[str, Target]:
    qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    targets: dict[str, Target] = {}
    for i in range(cfg.num_layers):
        layer = f"transformer.encoder.layers.{i}"
        for name, rows in (("self_attention.query_key_value", qkv_rows), ("self_attention.dense", cfg.hidden_size),
                           ("mlp.dense_h_to_4h", 2 * cfg.ffn_hidden_size), ("mlp.dense_4h_to_h", cfg.hidden_size)):
            targets[f"{layer}.{name}"] = _whole(f"{layer}.{name}", rows)
    targets["transformer.output_layer"] = _whole("transformer.output_layer", cfg.vocab_size)
    return targets


def _glm4_targets(cfg: ChatGLMConfig) -> dict[str, Target]:
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    targets: dict[str, Target] = {}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"transformer.encoder.layers.{i}"
        qkv = f"{ours}.self_attention.query_key_value"
        targets |= _split(qkv, [(f"{hf}.self_attn.q_proj", q_rows), (f"{hf}.self_attn.k_proj", kv_rows),
                                (f"{hf}.self_attn.v_proj", kv_rows)])
        targets[f"{hf}.self_attn.o_proj"] = _whole(f"{ours}.self_attention.dense", cfg.hidden_size)
        # transformers' Glm4MLP keeps the [gate | up] rows fused as we do
        targets[f"{hf}.mlp.gate_up_proj"] = _whole(f"{ours}.mlp.dense_h_to_4h", 2 * cfg.ffn_hidden_size)
        targets[f"{hf}.mlp.down_proj"] = _whole(f"{ours}.mlp.dense_4h_to_h", cfg.hidden_size)
    targets["lm_head"] = _whole("transformer.output_layer", cfg.vocab_size)
    return targets


def default_lora_targets(model: nn.Module) -> tuple[str, ...]:
    """The HF module names LoRA adapts when none are named: the attention's query and value projections,
    PEFT's own default for these architectures (ChatGLM: the fused query_key_value)."""
    if isinstance(model, ChatGLMForCausalLM) and not isinstance(model, Glm4ForCausalLM):
        return ("query_key_value",)
    return ("q_proj", "v_proj")
