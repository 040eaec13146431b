"""What a model is and what it costs, from its config alone (no weights are read).

The model is built on the meta device, so counting a 9B model takes no memory: parameter counts come from
the real module shapes, never from a second hand-written formula that could drift from the architecture.
Likewise the int8/int4 figures: the meta model is quantized by `quantize_model` itself (which modules, the
int8 head, group-size fallbacks, skipped shapes, scale dtypes, packed layouts) and its bytes counted by
`model_bytes`, as a real quantized load reports them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmstack.engine.loading.checkpoint import (
    build_model,
    open_checkpoint,
    pick_device,
    pick_dtype,
    stored_dtype,
    stored_precision,
)
from glmstack.engine.loading.json_files import read_json
from glmstack.engine.models import registry
from glmstack.engine.quant.int4 import DEFAULT_GROUP_SIZE
from glmstack.engine.quant.on_load import FIVE_BIT_BLOCKS
from glmstack.engine.quant.prequantized import GGUF_NATIVE_BITS
from glmstack.engine.quant.quantize_model import quantize_model


def describe(config: dict[str, Any] | str | Path, *, group_size: int | None = None,
             device: str | torch.device = "auto") -> dict[str, Any]:
    """Architecture, parameter count, context length, KV cache and weight memory of a model.

    `config` is a config.json dict, a config.json path, a checkpoint folder or a .gguf file. Memory is in
    bytes, weights only: fp16/bf16 at 2 bytes per parameter; int8/int4 are what `glmstack.load(...,
    quantize="int8"/"int4", device=device)` holds once quantized (its report's `bytes_after`, `model_bytes`):
    the model in the dtype that load picks, quantized by `quantize_model` for `device` with int4 groups of
    `group_size` (default: the loader's, DEFAULT_GROUP_SIZE). `quantizable_parameters` counts the weights
    that quantization replaces (the decoder layers' linears and the output head, a tied one included).
    """
    module, model, cfg_dict = _build(config)
    model.tie_weights()  # a tied head is one tensor, counted once
    total = sum(p.numel() for p in model.parameters())
    target = pick_device(device) if isinstance(device, str) else device
    quantized_bytes, quantized_names = _quantized_bytes(model, target, group_size or DEFAULT_GROUP_SIZE)
    quantized = sum(model.get_submodule(name).weight.numel() for name in quantized_names)
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
            "int8": quantized_bytes[8],
            "int4": quantized_bytes[4],
        },
    }


def default_load(path: Path, device: str = "auto") -> tuple[str, int]:
    """(precision, weight bytes) of what `glmstack.load(path)` holds with its defaults (`quantize="auto"`,
    dtype "auto"): a 16-bit checkpoint in bf16 where the CPU has it, a quantized checkpoint in its recorded
    precision, a GGUF in its own blocks where they map (Q4_0/Q4_1/Q4_K -> int4, 5-8-bit blocks -> int8, the
    head int8, the embedding in its type's precision), counted per tensor of the file."""
    target = pick_device(device)
    ckpt = open_checkpoint(path)
    try:
        precision = stored_precision(ckpt)
        info = describe(path, device=target)
        if precision is None:
            dtype = pick_dtype("auto", target, stored=stored_dtype(ckpt))
            return str(dtype).removeprefix("torch."), info["parameters"] * dtype.itemsize
        if ckpt.gguf is None:
            return precision, info["memory_bytes"][precision]
        return precision, _gguf_native_bytes(ckpt, int(precision[3:]))
    finally:
        if ckpt.gguf is not None:
            ckpt.gguf.close()


def _gguf_native_bytes(ckpt: Any, bits: int) -> int:
    """Bytes of a GGUF loaded as `LoadQuantizer` does: 2-D tensors in the native form their block type maps to
    (the head int8 whatever its type; tensors whose type maps to none quantized to `bits`), 1-D ones bf16."""
    total = 0
    for t in ckpt.gguf.tensors:
        if len(t.shape) != 2:
            total += 2 * t.n_elements
            continue
        n, k = t.shape
        native = 8 if t.name == "output.weight" else GGUF_NATIVE_BITS.get(t.type, bits)
        if bits == 4 and t.type in FIVE_BIT_BLOCKS and t.name != "output.weight":
            native = 4
        total += n * k + 2 * n if native == 8 else n * k // 2 + (k // 32) * n * 2 * 2
    if not any(t.name == "output.weight" for t in ckpt.gguf.tensors):  # tied: an int8 copy of the embedding
        embedding = next(t for t in ckpt.gguf.tensors if t.name == "token_embd.weight")
        total += embedding.n_elements + 2 * embedding.shape[0]
    return total


def _quantized_bytes(model: nn.Module, device: torch.device,
                     group_size: int) -> tuple[dict[int, int], list[str]]:
    """{bits: bytes} for int8 and int4 of the meta `model` as a quantized load onto `device` holds it, and
    the names of the linears int8 replaces."""
    # As glmstack.load(quantize=...): dtype "auto" is bf16 on CPU (the quantized kernels compute in bf16).
    dtype = torch.bfloat16 if device.type == "cpu" else pick_dtype("auto", device)
    loaded: Any = copy.deepcopy(model).to(dtype)  # as load_model: every checkpoint tensor in the load dtype,
    loaded.tie_weights()
    loaded.init_buffers(torch.device("meta"))  # and the recomputed (non-persistent) buffers as it makes them
    sizes: dict[int, int] = {}
    names: list[str] = []
    for bits in (8, 4):
        quantized = copy.deepcopy(loaded)
        report = quantize_model(quantized, bits, group_size=group_size, device=device)
        sizes[bits] = report.bytes_after
        if bits == 8:
            names = report.quantized
    return sizes, names


def _build(config: dict[str, Any] | str | Path) -> tuple[Any, nn.Module, dict[str, Any]]:
    if isinstance(config, dict):
        module = registry.resolve_hf(config)
        model_config = module.Model.config_class.from_hf(config)
        with torch.device("meta"):
            return module, module.Model(model_config), config
    path = Path(config)
    if path.suffix == ".gguf":
        ckpt = open_checkpoint(path)
        module, model = build_model(ckpt)
        return module, model, ckpt.config
    return _build(read_json(path / "config.json" if path.is_dir() else path))
