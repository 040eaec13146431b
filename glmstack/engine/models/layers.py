"""What several architecture files share: RMSNorm and the two rotary layouts (rotate-half, as Llama and
ChatGLM-6B use it, and adjacent pairs, as ChatGLM2/3 and GLM-4 do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) rotary: dims i and i + d/2 form a pair. x: [B, T, H, D], cos/sin: [B, T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op (small-batch decode is bound by op count); it accumulates in fp32 for bf16/fp16
        # inputs, as the reference implementations do by upcasting.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J style partial rotary: pairs (2i, 2i+1) of the first 2·len(cos) dims turn by angle i; the rest of
    the head passes through. This is what the THUDM code, transformers' Glm and llama.cpp's ROPE_TYPE_NORM
    compute. x: [B, H, T, D], cos/sin: [B, 1, T, R/2]."""
    rotary_dim = 2 * cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((turned, rest), dim=-1)
