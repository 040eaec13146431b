"""Weights that arrive already quantized (GGUF Q4_0/Q4_1, ChatGLM `quantization_bit: 4`) as `Int4Weights`,
without going through floats."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from glmstack.engine.quant.int4 import (
    Int4Weights,
)


def int4_weights_from_gguf(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType,
                           shape: tuple[int, int]) -> Int4Weights:
    """GGUF Q4_0 / Q4_1 blocks (32 weights each) as group-32 `Int4Weights`, without going through floats.

    Both map exactly onto the kernel's `(q - 8)·scale + zero`: Q4_0 is `d·(q - 8)` → scale d, zero 0;
    Q4_1 is `d·q + m` → scale d, zero m + 8d. With float32 scales the result equals GGUF's own
    dequantization bit for bit; bf16 scales (the fast CPU path) round d and m + 8d to 8 mantissa bits."""
    # np.array copies: the GGUF map is read-only and torch wants writable memory
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, dtype=np.uint8))
    if qtype == GGMLQuantizationType.Q4_0:
        blocks = data.view(-1, 18)  # f16 d, 16 bytes of nibbles
        d, nibbles = blocks[:, :2].contiguous().view(torch.float16).float(), blocks[:, 2:]
        zero = torch.zeros_like(d)
    elif qtype == GGMLQuantizationType.Q4_1:
        blocks = data.view(-1, 20)  # f16 d, f16 m, 16 bytes of nibbles
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        nibbles, zero = blocks[:, 4:], m + 8 * d
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit block type this converts (Q4_0, Q4_1)")
    n, k = shape
    codes = torch.cat((nibbles & 15, nibbles >> 4), dim=-1)  # ggml: element j low nibble, j + 16 high
    return Int4Weights(codes.reshape(n, k), d.view(n, k // 32), zero.view(n, k // 32), 32)


def int4_weights_from_chatglm(weight: torch.Tensor, weight_scale: torch.Tensor,
                              group_size: int = 128) -> Int4Weights:
    """A ChatGLM `quantization_bit: 4` checkpoint linear (spec 7.2: int8 [out, in/2], even element in the
    high nibble, symmetric values -7..7, one scale per row) as `Int4Weights`, exactly: code = q + 8, the
    row's scale repeated for every group, zero 0."""
    w = weight.to(torch.int8)
    hi, lo = w >> 4, (w << 4) >> 4  # arithmetic shifts sign-extend the nibbles
    q = torch.stack((hi, lo), dim=-1).view(w.shape[0], -1)
    groups = q.shape[1] // group_size
    scales = weight_scale.float()[:, None].expand(-1, groups).contiguous()
    return Int4Weights((q + 8).to(torch.uint8), scales, torch.zeros_like(scales), group_size)


