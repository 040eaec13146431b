"""What a model is and what it costs, from its config alone (no weights are read).

The model is built on the meta device, so counting a 9B model takes no memory: parameter counts come from
the real module shapes, never from a second hand-written formula that could drift from the architecture.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmstack.engine.errors import ModelFileError
from glmstack.engine.models import registry

# Weights inside a decoder layer (`...layers.N...`) are the ones weight-only quantization replaces (spec 7.2):
# embeddings, the output head, norms and biases stay 16-bit.
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def describe(config: dict[str, Any] | str | Path, *, group_size: int | None = None) -> dict[str, Any]:
    """Architecture, parameter count, context length, KV cache and weight memory of a model.

    `config` is a config.json dict, a config.json path, a checkpoint folder or a .gguf file. Memory is in
    bytes, weights only: fp16/bf16 at 2 bytes per parameter; int8/int4 quantize every linear weight inside
    the decoder layers with one fp16 scale per output row (or per `group_size` inputs of a row) and keep
    everything else at 16 bits.
    """
    module, model, cfg_dict = _build(config)
    model.tie_weights()  # a tied head is one tensor, counted once
    total = sum(p.numel() for p in model.parameters())
    linear = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and _LAYER.search(name)]
    quantized = sum(m.weight.numel() for m in linear)
    groups_per_row = [1 if group_size is None else math.ceil(m.in_features / group_size) for m in linear]
    scales = sum(m.out_features * g for m, g in zip(linear, groups_per_row, strict=True))
    kept = 2 * (total - quantized + scales)  # unquantized parameters and the fp16 scales
    cfg = model.config
    architectures = cfg_dict.get("architectures") or [cfg_dict.get("general.architecture", "")]
    return {
        "architecture": architectures[0] or cfg_dict.get("model_type", ""),
        "implementation": module.__name__.rsplit(".", 1)[-1],
        "parameters": total,
        "quantizable_parameters": quantized,
        "context_length": cfg.context_length,
        "kv_cache_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2,  # k and v, fp16
        "memory_bytes": {
            "fp16": 2 * total,
            "bf16": 2 * total,
            "int8": kept + quantized,
            "int4": kept + quantized // 2,
        },
    }


def _build(config: dict[str, Any] | str | Path) -> tuple[Any, nn.Module, dict[str, Any]]:
    if isinstance(config, dict):
        module = registry.resolve_hf(config)
        model_config = module.Model.config_class.from_hf(config)
        with torch.device("meta"):
            return module, module.Model(model_config), config
    path = Path(config)
    if path.suffix == ".gguf":
        from glmstack.engine.loading.checkpoint import build_model, open_checkpoint

        ckpt = open_checkpoint(path)
        module, model = build_model(ckpt)
        return module, model, ckpt.config
    json_path = path / "config.json" if path.is_dir() else path
    try:
        config_dict = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(json_path, "file is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(json_path, f"invalid JSON: {exc}") from None
    return _build(config_dict)
