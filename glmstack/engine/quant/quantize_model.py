"""`quantize_model()`: every linear of the decoder layers (and the head) replaced by an int8 or int4 one.

Batch-1 decode reads every weight once per token, so it runs at weight bytes / memory bandwidth: fewer bytes
per weight is speed, not only memory.

On x86 CPUs with AVX-512, decode-sized inputs (up to `NATIVE_MAX_ROWS` rows) go to our own kernels
(glmstack/engine/native: fp32 accumulation, fp32 or bf16 activations, 30-40 GB/s on 2 cores against 6-9 GB/s
for ATen's), and `Int4Linear` then stores its nibbles in that kernel's layout (`pack_int4_native`; prompts
dequantize from it). Everywhere else — no AVX-512, no compiler, GLMSTACK_NATIVE=0, GPUs — the kernels are
PyTorch's own "tinygemm" ops (int8.py and int4.py say which).

The fused CPU kernels dequantize per 4-row tile, so for prompts (many rows) they are ~9x slower than a bf16
GEMM (which uses AMX where present). From `DEQUANT_MIN_ROWS` (int8) / `INT4_DEQUANT_MIN_ROWS` (int4) rows
on, weights are dequantized a slice at a time into a reused scratch buffer and multiplied by that GEMM.
On CPU the quantized linears compute in bf16 whatever the model dtype (activations are cast at the
boundary): that is where the fast kernels are.

Which modules: every `nn.Linear` inside a decoder layer, plus the output head (unless `quantize_head=False`).
Embeddings, norms and biases stay as they are. A tied head gets its own quantized copy; the embedding is
never touched. Linears a kernel cannot take (shapes) stay unquantized and are listed in the report.

A model on the meta device (describe.py's: built from a config, no weights) goes through the very same code
with `device=` naming the device it would be quantized on: every linear is replaced by the module a real
load would get, holding meta tensors of the same shapes and dtypes, and `model_bytes` then counts what those
would hold. So `glmstack inspect`'s int8/int4 figures are this module's decisions, not a second formula.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from glmstack.engine.quant.embedding import QuantizedEmbedding
from glmstack.engine.quant.int4 import (
    DEFAULT_GROUP_SIZE,
    INT4_GROUP_SIZES,
    Int4Linear,
    Int4Weights,
    int4_unsupported_reason,
    quantize_int4,
)
from glmstack.engine.quant.int8 import Int8Linear, Int8Weights, quantize_int8
from glmstack.engine.quant.linear_base import (
    kernel_dtype,
)

log = logging.getLogger(__name__)

QuantizedWeights = Int4Weights | Int8Weights  # a linear's weights in the kernels' plain forms

DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")  # module names inside a decoder layer


# ---- whole models -----------------------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    bits: int
    group_size: int | None
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it stayed unquantized
    embedding_bits: int | None = None  # the token embedding's, once quantized
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mb = 1024 * 1024
        kind = "no quantization" if not self.bits else f"int{self.bits}"
        return (f"{kind}: {len(self.quantized)} linears quantized, {len(self.skipped)} kept, "
                f"{self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (a tied head is shared).
    Meta tensors count the bytes they would hold (a meta storage has a size but no address: it is told apart
    by identity)."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (t.device, storage._cdata if t.is_meta else storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def quantize_model(
    model: nn.Module,
    bits: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_head: bool = True,
    quantize_embedding: bool = True,
    prequantized: Mapping[str, QuantizedWeights | nn.Module] | None = None,
    device: torch.device | str | None = None,
) -> QuantizationReport:
    """Replace the decoder layers' linears (and the output head) with `Int8Linear` (bits=8) or `Int4Linear`
    (bits=4) in place. bits=0 does nothing; a second call logs "already quantized" and changes nothing.

    int4 uses `group_size` (32/64/128/256) where it divides a linear's input size, else the largest smaller
    one that does. The head is int8 for bits=4 too: on the bundled SmolLM2 an int4 head raises the KL to the
    bf16 model from 0.005 to 0.054 (top-1 agreement 0.95 -> 0.83); llama.cpp's 4-bit presets likewise keep
    output.weight at 6 bits. `prequantized` maps module names to what the loader quantized as it read them
    (`on_load`): weights in the kernels' forms or ready modules, used as they are whatever `bits` says.

    The token embedding is quantized too (`quantize_embedding`; int4 rows for bits=4, int8 for 8): its rows
    are dequantized as they are looked up (quant/embedding.py). An int8 head tied to it shares its tensors.

    `device` is the device whose kernels the linears are quantized for: by default the one the model's weights
    are on. A model on the meta device needs it, and is quantized as it would be there, in shapes only (the
    report's bytes are then what that model would hold; see the module docstring).
    """
    if bits not in (0, 4, 8):
        raise ValueError(f"bits must be 0 (no quantization), 4 or 8, not {bits}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, not {group_size}")
    before = model_bytes(model)
    report = QuantizationReport(bits, group_size if bits == 4 else None, bytes_before=before,
                                bytes_after=before)
    if bits == 0:
        return report
    if getattr(model, "quantization", None):
        log.info("already quantized (%s); ignoring quantize(%d)", model.quantization, bits)
        report.bits = int(model.quantization[3:])
        return report
    # With `prequantized`, the loader may have left those linears' float weights on the meta device.
    where = next((t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta),
                 torch.device("meta"))
    if device is None:
        if where.type == "meta":
            raise ValueError("the model is on the meta device: say which device to quantize it for (device=)")
        device = where
    device = torch.device(device)
    if where.type not in ("meta", device.type):
        raise ValueError(f"the model is on {where}, not {device}: move it there before quantizing")
    prequantized = dict(prequantized or {})
    plan, report.skipped = plan_quantization(model, bits, group_size, device, quantize_head=quantize_head)
    for name, (module_bits, module_group) in plan.items():
        linear = model.get_submodule(name)
        new = _quantized(linear, module_bits, module_group, prequantized.pop(name, None), device, where)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.quantized.append(name)
    if quantize_embedding:
        _quantize_embedding(model, bits, plan, prequantized, device, where, report)
    _int8_to_lanes(model)
    if prequantized:
        raise ValueError(f"prequantized weights for modules that are not quantized linears: "
                         f"{sorted(prequantized)}")
    model.quantization = f"int{bits}"
    report.bytes_after = model_bytes(model)
    log.info("%s", report)
    return report


def _int8_to_lanes(model: nn.Module) -> None:
    """Int8 linears into the VNNI kernel's lane layout (`Int8Linear.use_lanes`), all but a head tied to the
    embedding: the embedding looks its rows up in row layout."""
    shared = {t.data_ptr() for m in model.modules() if isinstance(m, QuantizedEmbedding) for t in m.buffers()}
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.weight.data_ptr() not in shared:
            module.use_lanes()


def plan_quantization(model: nn.Module, bits: int, group_size: int, device: torch.device, *,
                      quantize_head: bool = True) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Which linears `quantize_model` replaces, each with its (bits, int4 group size), and the ones that stay
    unquantized with the reason. The loader asks the same question to quantize weights as it reads them."""
    head = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
    plan: dict[str, tuple[int, int]] = {}
    skipped: dict[str, str] = {}
    for name, linear in model.named_modules():
        if not isinstance(linear, nn.Linear) or not (DECODER_LAYER.search(name) or (quantize_head and name == head)):
            continue
        if name == head or bits == 8:  # the head is int8 for bits=4 too (see quantize_model)
            plan[name] = (8, 0)
            continue
        n, k = linear.out_features, linear.in_features
        sizes = [g for g in INT4_GROUP_SIZES if g <= group_size and k % g == 0]
        reason = int4_unsupported_reason(n, k, sizes[-1], device) if sizes else \
            f"in_features {k} is not a multiple of 32"
        if reason:
            log.debug("keeping %s unquantized: %s", name, reason)
            skipped[name] = reason
            continue
        if sizes[-1] != group_size:
            log.debug("%s: in_features %d needs group size %d instead of %d", name, k, sizes[-1], group_size)
        plan[name] = (4, sizes[-1])
    return plan, skipped


def embedding_name(model: nn.Module) -> str | None:
    """The token embedding's module name (the model's one nn.Embedding), or None."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding | QuantizedEmbedding)]
    return found[0] if len(found) == 1 else None


def quantize_embedding_weights(weight: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> QuantizedWeights:
    """An embedding's rows at `bits` (int4 groups of 32 where its width allows, else int8)."""
    if bits == 4 and weight.shape[1] % 32 == 0:
        return quantize_int4(weight, 32, scale_dtype)
    return Int8Weights(*quantize_int8(weight, scale_dtype))


def _quantize_embedding(model: nn.Module, bits: int, plan: dict[str, tuple[int, int]],
                        prequantized: dict[str, QuantizedWeights | nn.Module], device: torch.device,
                        where: torch.device, report: QuantizationReport) -> None:
    name = embedding_name(model)
    if name is None:
        return
    embedding = model.get_submodule(name)
    ready = prequantized.pop(name, None)
    if isinstance(embedding, QuantizedEmbedding):
        return
    model_dtype = embedding.weight.dtype
    scale_dtype = kernel_dtype(device, model_dtype)
    head_name = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
    head = model.get_submodule(head_name) if head_name in plan else None
    tied = getattr(model.config, "tie_word_embeddings", False)
    if isinstance(ready, nn.Module):
        new = ready
    elif ready is not None:
        new = QuantizedEmbedding(ready, scale_dtype=scale_dtype, dtype=model_dtype)
    elif tied and bits == 8 and isinstance(head, Int8Linear):
        new = QuantizedEmbedding.sharing(head.weight, head.weight_scale, model_dtype)
    else:
        weights = quantize_embedding_weights(embedding.weight.detach(), bits, scale_dtype)
        new = QuantizedEmbedding(weights, scale_dtype=scale_dtype, dtype=model_dtype)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
    report.embedding_bits = new.bits


def quantized_linear(weights: Int4Weights | Int8Weights, *, bias: torch.Tensor | None, model_dtype: torch.dtype,
                     device: torch.device, where: torch.device) -> nn.Module:
    """The Int4Linear / Int8Linear holding `weights`, packed for `device`'s kernels, its tensors on `where`."""
    if isinstance(weights, Int8Weights):
        return Int8Linear.from_weights(weights, bias=bias, dtype=kernel_dtype(device, model_dtype), device=where)
    return Int4Linear.from_weights(weights, bias=bias, dtype=kernel_dtype(device, model_dtype, bits=4),
                                   device=where, for_device=device)


def _quantized(linear: nn.Linear, bits: int, group_size: int, ready: QuantizedWeights | nn.Module | None,
               device: torch.device, where: torch.device) -> nn.Module:
    """The module replacing `linear` when quantized for `device`, its tensors on `where` (`device`, or meta).
    `ready`: the loader's module (quantized as it read the weight: `on_load`) or weights that arrived
    quantized; either way the float module contributes only its bias."""
    bias = None if linear.bias is None else linear.bias.detach()
    if isinstance(ready, nn.Module):
        if bias is not None:
            ready.bias = nn.Parameter(bias.to(where).clone(), requires_grad=False)
        return ready
    if ready is not None:
        return quantized_linear(ready, bias=bias, model_dtype=linear.weight.dtype, device=device, where=where)
    if bits == 8:
        return Int8Linear.from_linear(linear, dtype=kernel_dtype(device, linear.weight.dtype))
    dtype = kernel_dtype(device, linear.weight.dtype, bits=4)
    weights = quantize_int4(linear.weight.detach(), group_size, dtype)  # what Int4Linear.from_linear does
    return Int4Linear.from_weights(weights, bias=bias, dtype=dtype, device=linear.weight.device,
                                   for_device=device)
