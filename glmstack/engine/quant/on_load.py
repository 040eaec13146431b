"""Quantizing while loading: each linear's weight becomes int8/int4 as soon as the loader has read it.

Loading floats first and quantizing after holds the whole model in floats at once (a 9B bf16 checkpoint:
~18 GB, or ~36 GB in fp32) on the way to a ~5 GB int4 model. Here the loader hands every weight of a linear
`quantize_model` would replace to `LoadQuantizer` the moment it is read, so the peak is the quantized model
plus one tensor in flight. Which linears, and with which bits and groups, is `plan_quantization`'s answer,
the same one `quantize_model` acts on; the modules built here go in through its `prequantized` argument.

A GGUF's blocks are taken as they are where they map onto a kernel's grid (`native_weights_from_gguf`): Q4_0,
Q4_1 and Q4_K become int4 without going through floats, 5- to 8-bit blocks int8, so a Q4_K_M file keeps the
mix its preset chose.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType
from torch import nn

from glmstack.engine import native
from glmstack.engine.loading.gguf_file import GGUFFile, GGUFTensorInfo
from glmstack.engine.quant.embedding import QuantizedEmbedding
from glmstack.engine.quant.int4 import (
    Int4Linear,
    Int4Weights,
    PackedInt4,
    quantize_int4,
    quantize_int4_packed,
)
from glmstack.engine.quant.int8 import Int8Weights, quantize_int8
from glmstack.engine.quant.linear_base import kernel_dtype
from glmstack.engine.quant.prequantized import GGUF_NATIVE_BITS, native_weights_from_gguf
from glmstack.engine.quant.quantize_model import (
    QuantizedWeights,
    embedding_name,
    plan_quantization,
    quantize_embedding_weights,
    quantized_linear,
)

# In a 4-bit file, 5-bit tensors are llama.cpp's fallbacks for rows that are not whole Q4_K super-blocks
# (GLM-4's 13,696-wide ffn_down in Q4_K_M: Q5_0): they go to int4 as the preset meant, not to int8 at 8.25 bits
# per weight (on a 6.2B GLM-4 that alone was ~300 MB more than the file). Measured conversion error: see
# benchmarks/bench_gguf_native.py. 6-bit tensors (the preset's deliberate "more bits") stay int8.
FIVE_BIT_BLOCKS = (GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q5_K)


class LoadQuantizer:
    """What the loader asks about each tensor: should it be quantized (`target`), and how (`from_gguf`,
    `from_float`, then `build` once a parameter's pieces are joined)."""

    def __init__(self, model: nn.Module, bits: int, group_size: int, device: torch.device,
                 model_dtype: torch.dtype) -> None:
        self.bits, self.device, self.model_dtype = bits, device, model_dtype
        self.plan, _ = plan_quantization(model, bits, group_size, device)
        head = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
        self.embedding = embedding_name(model)
        if getattr(model.config, "tie_word_embeddings", False):
            # A tied head is the embedding, loaded as floats: quantize_model makes the int8 head from them and
            # then quantizes the embedding (or shares the head's int8 rows).
            self.plan.pop(head, None)
            self.embedding = None
        elif self.embedding is not None:
            self.plan[self.embedding] = (bits, 32)

    def target(self, parameter: str) -> tuple[str, int, int] | None:
        """(module, bits, int4 group size) when `parameter` is the weight of a linear to quantize."""
        module, _, kind = parameter.rpartition(".")
        if kind != "weight" or module not in self.plan:
            return None
        return (module, *self.plan[module])

    def from_gguf(self, gguf: GGUFFile, info: GGUFTensorInfo, bits: int) -> QuantizedWeights | None:
        """The file's own blocks in a kernel's form, where they map (None: dequantize and quantize instead).
        With bits=4 (int4 asked, or the file's own 4-bit preset) every type that maps goes in at its own
        precision - int4 for 4-bit blocks, int8 for the 5-8-bit tensors a K-quant preset kept finer; with
        bits=8 only what maps to int8."""
        native = GGUF_NATIVE_BITS.get(info.type)
        if native is None or len(info.shape) != 2 or (bits == 8 and native != 8):
            return None
        if bits == 4 and info.type in FIVE_BIT_BLOCKS:
            native = 4
        scale_dtype = kernel_dtype(self.device, self.model_dtype, bits=native)
        weights = native_weights_from_gguf(gguf.raw(info), info.type, (info.shape[0], info.shape[1]),
                                           scale_dtype, bits=native)
        gguf.release(info)
        return weights

    def from_float(self, module: str, weight: torch.Tensor, bits: int, group_size: int, *,
                   whole: bool = True) -> QuantizedWeights | PackedInt4:
        """One weight (or, `whole=False`, one piece of a split one: quantization is per output row, so pieces
        quantized apart equal the joined weight quantized whole). A whole int4 weight bound for the native CPU
        kernels is packed a slice at a time, never held as one byte per weight."""
        if bits == 4 and whole and self.device.type == "cpu" and native.available() and weight.shape[1] % 32 == 0:
            return quantize_int4_packed(weight, 32 if module == self.embedding else group_size,
                                        kernel_dtype(self.device, self.model_dtype, bits=4))
        if module == self.embedding:
            return quantize_embedding_weights(weight, bits, kernel_dtype(self.device, self.model_dtype))
        if bits == 8:
            q, scale = quantize_int8(weight, kernel_dtype(self.device, self.model_dtype))
            return Int8Weights(q, scale)
        return quantize_int4(weight, group_size, kernel_dtype(self.device, self.model_dtype, bits=4))

    def build(self, module: str, weights: QuantizedWeights | PackedInt4) -> nn.Module:
        """The quantized linear, packed for the device's kernels (its bias comes later, from the float
        module, in quantize_model), or the quantized embedding."""
        if isinstance(weights, PackedInt4):
            if module == self.embedding:
                return QuantizedEmbedding.from_packed(weights, self.model_dtype)
            return Int4Linear.from_native_packed(weights.packed, weights.scales_and_zeros, weights.group_size)
        if module == self.embedding:
            return QuantizedEmbedding(weights, scale_dtype=kernel_dtype(self.device, self.model_dtype),
                                      dtype=self.model_dtype)
        return quantized_linear(weights, bias=None, model_dtype=self.model_dtype, device=self.device,
                                where=self.device)


def join_quantized(model: nn.Module, name: str, pieces: dict[str, QuantizedWeights]) -> QuantizedWeights | None:
    """A split parameter's quantized pieces joined by the model's row-wise `join_pieces` (applied to each part:
    codes, scales, zeros / weight, scale); None until all pieces are there. Pieces at different precisions (a
    K-quant preset keeps attn_v finer than attn_q) are joined at the finer one: int4 pieces are widened to
    int8, which represents their values to within a 254th of each row's range."""
    int8 = [p for p in pieces.values() if isinstance(p, Int8Weights)]
    if int8 and len(int8) < len(pieces):
        scale_dtype = int8[0].scale.dtype
        pieces = {k: p if isinstance(p, Int8Weights) else Int8Weights(*quantize_int8(p.dequantize(), scale_dtype))
                  for k, p in pieces.items()}
    join: Callable[[str, dict[str, torch.Tensor]], torch.Tensor | None] = getattr(model, "join_pieces")  # noqa: B009
    first = next(iter(pieces.values()))
    if isinstance(first, Int8Weights):
        weight = join(name, {k: getattr(p, "weight") for k, p in pieces.items()})  # noqa: B009
        scale = join(name, {k: getattr(p, "scale") for k, p in pieces.items()})  # noqa: B009
        return None if weight is None or scale is None else Int8Weights(weight, scale)
    parts = [join(name, {k: getattr(p, part) for k, p in pieces.items()}) for part in ("codes", "scales", "zeros")]
    if parts[0] is None or parts[1] is None or parts[2] is None:
        return None
    return Int4Weights(parts[0], parts[1], parts[2], first.group_size)
