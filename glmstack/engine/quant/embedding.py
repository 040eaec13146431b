"""`QuantizedEmbedding`: the token embedding in int8 or int4, its rows dequantized as they are looked up.

The embedding is the largest single tensor of a GLM-4 model (151,552 x 4,096: 1.24 GB in bf16, more than a
quarter of an int4 GLM-4-9B) and a step reads only the rows of the tokens it computes, so storing it
quantized costs nothing in speed; llama.cpp's presets do the same (Q4_K_M stores token_embd as Q4_K). Rows
are kept in the linears' plain forms - int8 per row (`Int8Weights`), int4 in groups of 32 in the native
kernel's packed layout - so a GGUF's own blocks (Q4_0/Q4_1/Q4_K -> int4, Q5-Q8 -> int8) go in unchanged, and
an int8 head tied to the embedding shares its tensors with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine.quant.int4 import Int4Weights, PackedInt4, pack_int4_native
from glmstack.engine.quant.int8 import Int8Weights


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's forward over int8 rows (`weight` int8 [V, D] + `weight_scale` [V]) or int4 rows
    (`qweight` uint8 [V, D/2] + `scales_and_zeros` [V, 2, D/group]), returning `dtype`."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    qweight: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, weights: Int8Weights | Int4Weights, *, scale_dtype: torch.dtype,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype  # what lookups return: the model's dtype
        if isinstance(weights, Int8Weights):
            self.bits, self.group_size = 8, 0
            self.num_embeddings, self.embedding_dim = weights.weight.shape
            self.register_buffer("weight", weights.weight.contiguous())
            self.register_buffer("weight_scale", weights.scale.to(scale_dtype))
        else:
            self.bits, self.group_size = 4, weights.group_size
            self.num_embeddings, self.embedding_dim = weights.codes.shape
            packed, sz = pack_int4_native(weights, scale_dtype)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", sz)

    @classmethod
    def from_packed(cls, weights: PackedInt4, dtype: torch.dtype) -> QuantizedEmbedding:
        """int4 rows already in the packed layout (`quantize_int4_packed`, a saved checkpoint)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.dtype, module.bits, module.group_size = dtype, 4, weights.group_size
        module.num_embeddings, module.embedding_dim = weights.shape
        module.register_buffer("qweight", weights.packed)
        module.register_buffer("scales_and_zeros", weights.scales_and_zeros)
        return module

    @classmethod
    def sharing(cls, weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> QuantizedEmbedding:
        """An int8 embedding over an int8 head's own tensors (a tied head: one copy of the rows)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.dtype, module.bits, module.group_size = dtype, 8, 0
        module.num_embeddings, module.embedding_dim = weight.shape
        module.register_buffer("weight", weight)
        module.register_buffer("weight_scale", weight_scale)
        return module

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedEmbedding:
        # .to(dtype) / .half() / .float() change what lookups return, as they would a float embedding's weight
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # in fp32, rounded once to the model dtype: the values a float embedding loaded from the same
        # quantized rows would hold
        if self.bits == 8:
            rows = F.embedding(ids, self.weight).float()
            return (rows * self.weight_scale[ids].float()[..., None]).to(self.dtype)
        packed = F.embedding(ids, self.qweight)  # [..., D/2]
        d, g = self.embedding_dim, self.group_size
        blocks = packed.view(*ids.shape, d // 32, 16)
        codes = torch.cat((blocks & 15, blocks >> 4), dim=-1).view(*ids.shape, d // g, g).float()
        sz = self.scales_and_zeros[ids].float()  # [..., 2, D/g]
        scale, zero = sz[..., 0, :, None], sz[..., 1, :, None]
        return ((codes - 8) * scale + zero).view(*ids.shape, d).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, dtype={self.dtype}"
