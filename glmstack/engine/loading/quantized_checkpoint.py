"""Quantized checkpoints glmstack writes (`glmstack quantize MODEL --bits 4|8 -o DIR`) and reads back.

A folder like the source checkpoint - config.json, tokenizer and generation files copied - whose
model.safetensors holds the weights in the kernels' own forms, under the engine's parameter names:

- an int4 linear `m`: `m.qweight` (uint8 [N, K/2]: per 32 inputs, 16 bytes with input j in the low nibble and
  j + 16 in the high one, as GGUF Q4 blocks) and `m.scales_and_zeros` ([N, 2, K/group]: each row's scales,
  then its zeros; w = (q - 8)·scale + zero);
- an int8 linear `m`: `m.weight` (int8 [N, K]) and `m.weight_scale` ([N]; ChatGLM's int8 names);
- everything else (embeddings, norms, biases) as the float tensors the model holds.

The quantization is recorded in config.json, not in a file name:
`"quantization_config": {"quant_method": "glmstack", "bits": 4, "group_size": 32, "version": 1}`.
The int4 layout is the native CPU kernel's, so on such a CPU loading is reading bytes into place: as fast as
a plain checkpoint of that size.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from glmstack.engine import native
from glmstack.engine.errors import ModelFileError
from glmstack.engine.quant.embedding import QuantizedEmbedding
from glmstack.engine.quant.int4 import Int4Linear, Int4Weights
from glmstack.engine.quant.int8 import Int8Linear, Int8Weights
from glmstack.engine.quant.linear_base import kernel_dtype
from glmstack.engine.quant.quantize_model import embedding_name, quantized_linear

if TYPE_CHECKING:
    from glmstack.engine.loading.checkpoint import Checkpoint, LoadedModel

QUANT_METHOD = "glmstack"
FORMAT_VERSION = 1
# Files of a checkpoint folder besides its weights that a quantized copy keeps (the tokenizer, generation
# defaults, chat template); never code.
_KEPT_SUFFIXES = (".json", ".model", ".tiktoken", ".txt", ".jinja")
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def saved_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization a config.json records (`glmstack quantize`'s), or None. Other tools' records
    (GPTQ, AWQ, ...) are not ours: None, and the loader treats the checkpoint as it always did."""
    record = config.get("quantization_config")
    if not isinstance(record, dict) or record.get("quant_method") != QUANT_METHOD:
        return None
    if record.get("bits") not in (4, 8) or record.get("version") != FORMAT_VERSION:
        raise ModelFileError(Path("config.json"), f"quantization_config {record!r} is not one this glmstack "
                                                  f"reads (bits 4 or 8, version {FORMAT_VERSION})",
                             field="quantization_config")
    return record


# ---- writing -----------------------------------------------------------------------------------------------


def save_quantized(loaded: LoadedModel, bits: int, group_size: int, out: Path) -> int:
    """Write `loaded` (loaded with `load_model(..., quantize=bits)`, not yet installed into the model) as a
    quantized checkpoint folder `out`; returns the bytes of weights written. The folder is written beside its
    final name and renamed into place, so an interrupted run leaves no half checkpoint."""
    from safetensors.torch import save_file

    src = loaded.checkpoint.path
    if loaded.checkpoint.format == "gguf":
        raise ValueError(f"{src} is a GGUF file: it is already quantized, and glmstack runs it as it is")
    if out.exists():
        raise ValueError(f"{out} already exists; choose a new folder")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in loaded.prequantized.items():
        tensors.update(_portable(name, module))
    quantized = {f"{name}.weight" for name in loaded.prequantized}
    for name, tensor in loaded.module.state_dict().items():
        if name not in quantized and not tensor.is_meta:
            tensors[name] = tensor.detach().to("cpu").contiguous()
    if getattr(loaded.module.config, "tie_word_embeddings", False):
        head = getattr(loaded.module, "output_weight_name", "lm_head.weight")
        tensors.pop(head, None)  # the embedding; tied again on load
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    folder = src if src.is_dir() else src.parent
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _KEPT_SUFFIXES and path.name not in _WEIGHT_FILES:
            shutil.copy2(path, partial / path.name)
    config = dict(loaded.checkpoint.config)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size,
                                     "version": FORMAT_VERSION}
    (partial / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt", "glmstack_bits": str(bits)})
    partial.rename(out)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _portable(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(module, QuantizedEmbedding):  # the same names as a linear's
        return {f"{name}.{key}": tensor for key, tensor in module.state_dict().items()}
    if isinstance(module, Int4Linear) and module.packed_for != "cpu-native":
        raise ValueError("writing an int4 checkpoint needs glmstack's native CPU kernels (a C++ compiler and an "
                         "x86 CPU with AVX-512); `glmstack quantize --bits 8` works everywhere")
    assert isinstance(module, Int8Linear | Int4Linear)
    # Int8Linear: weight, weight_scale; Int4Linear: weight is the packed nibbles, stored as qweight
    tensors = {key: tensor.cpu() for key, tensor in module.state_dict().items() if key != "bias"}
    if isinstance(module, Int4Linear):  # in row layout, whatever the module holds
        del tensors["weight"]
        tensors["qweight"], tensors["scales_and_zeros"] = (t.cpu() for t in module.row_layout())
    else:
        tensors["weight"] = module.row_weight().cpu()
    return {f"{name}.{key}": tensor for key, tensor in tensors.items()}


# ---- reading -----------------------------------------------------------------------------------------------


def load_saved_quantized(ckpt: Checkpoint, arch_module: ModuleType, model: nn.Module, device: torch.device,
                         dtype: torch.dtype, started: float, progress: bool) -> LoadedModel:
    """`load_model` for a checkpoint `save_quantized` wrote: the quantized linears come back as ready modules
    (`LoadedModel.prequantized`, installed by `quantize_model`), the rest as floats in `dtype`."""
    from glmstack.engine.loading.checkpoint import LoadedModel, iter_tensors, progress_bar

    expected = dict(model.state_dict(keep_vars=True))
    embedding = embedding_name(model)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    loaded: dict[str, torch.Tensor] = {}
    prequantized: dict[str, nn.Module] = {}
    tensors = list(iter_tensors(ckpt))
    bar = progress_bar(len(tensors), f"Loading {ckpt.path.name}", progress)
    for name, load in tensors:
        bar.update(1)
        module, _, kind = name.rpartition(".")
        tensor = load()
        if kind in ("qweight", "scales_and_zeros") or (kind in ("weight", "weight_scale")
                                                        and f"{module}.weight" in expected
                                                        and (kind == "weight_scale" or tensor.dtype == torch.int8)):
            parts.setdefault(module, {})[kind] = tensor
            if len(parts[module]) == 2:
                prequantized[module] = _module(ckpt, module, parts.pop(module), expected, device, dtype,
                                               embedding=module == embedding)
            continue
        if name not in expected:
            raise ModelFileError(ckpt.path, f"tensor {name} is not a parameter of this model", field=name)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFileError(ckpt.path, f"tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                                            f"{tuple(expected[name].shape)}", field=name)
        loaded[name] = tensor.to(device=device, dtype=dtype)
    bar.close()
    if parts:
        raise ModelFileError(ckpt.path, f"quantized tensors of {sorted(parts)[0]} are incomplete")
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = getattr(model, "output_weight_name", "lm_head.weight")
    kept = {f"{m}.weight" for m in prequantized}
    missing = [n for n in expected if n not in loaded and n not in kept and not (tied and n == head)]
    if missing:
        raise ModelFileError(ckpt.path, f"checkpoint is missing {len(missing)} tensors the config requires: "
                                        f"{', '.join(missing[:8])}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()  # type: ignore[operator]  # every model file defines these
    model.init_buffers(device)  # type: ignore[operator]
    model.eval()
    return LoadedModel(model, arch_module, ckpt, device, dtype, time.perf_counter() - started, prequantized)


def _module(ckpt: Checkpoint, module: str, parts: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
            device: torch.device, dtype: torch.dtype, *, embedding: bool) -> nn.Module:
    want = tuple(expected[f"{module}.weight"].shape)
    if "qweight" in parts:
        packed, sz = parts["qweight"], parts["scales_and_zeros"]
        n, half = packed.shape
        k = 2 * half
        if (n, k) != want or sz.dim() != 3 or sz.shape[:2] != (n, 2) or k % sz.shape[2]:
            raise ModelFileError(ckpt.path, f"int4 tensors of {module} do not fit its shape {want}", field=module)
        if embedding:
            return QuantizedEmbedding(unpack_int4(packed, sz, k // sz.shape[2]), scale_dtype=sz.dtype, dtype=dtype)
        if device.type == "cpu" and native.available():  # the bytes are already in the kernel's layout
            return Int4Linear.from_native_packed(packed, sz.to(kernel_dtype(device, dtype, bits=4)),
                                                 k // sz.shape[2])
        weights = unpack_int4(packed, sz, k // sz.shape[2])
        return quantized_linear(weights, bias=None, model_dtype=dtype, device=device, where=device)
    weight, scale = parts["weight"], parts["weight_scale"]
    if tuple(weight.shape) != want or tuple(scale.shape) != want[:1]:
        raise ModelFileError(ckpt.path, f"int8 tensors of {module} do not fit its shape {want}", field=module)
    if embedding:
        return QuantizedEmbedding(Int8Weights(weight, scale), scale_dtype=scale.dtype, dtype=dtype)
    return quantized_linear(Int8Weights(weight, scale), bias=None, model_dtype=dtype, device=device,
                            where=device)


def unpack_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> Int4Weights:
    """`pack_int4_native`'s inverse: the plain Int4Weights of a packed linear."""
    n, half = packed.shape
    blocks = packed.view(n, half // 16, 16)
    codes = torch.cat((blocks & 15, blocks >> 4), dim=-1).reshape(n, 2 * half)
    sz = scales_and_zeros.float()
    return Int4Weights(codes, sz[:, 0].contiguous(), sz[:, 1].contiguous(), group_size)

