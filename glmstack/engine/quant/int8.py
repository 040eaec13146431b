"""Weight-only int8: `Int8Linear`.

Off the native kernels: `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`, symmetric per
output row — ChatGLM's W8A16 scheme (spec 7.2), with its state-dict names (`weight`, `weight_scale`). x and scales
must share a dtype. On x86 only bf16 is vectorised (fp32/fp16 run a scalar loop, ~12x slower), and the
AVX-512 loop reads x and w with *aligned* 16-element loads: K must be a multiple of 16 and x's data
32-byte aligned (we keep 64), or the process segfaults — hence the checks below. The CUDA version is a
naive one-thread-per-output kernel, so on GPUs we dequantize and call cuBLAS instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine import native
from glmstack.engine.quant.linear_base import (
    LANE_TILE,
    NATIVE_DTYPES,
    NATIVE_MAX_ROWS,
    NativeLinear,
    aligned,
    bias_parameter,
    kernel_dtype,
    permute_tiles_in_place,
    row_slices,
    scratch_buffer,
)

# Off the native kernels, from this many activation rows on, dequantize-then-GEMM beats ATen's fused int8
# kernel (benchmarks/bench_quant_kernels.py --m N).
DEQUANT_MIN_ROWS = 16  # int8: converting int8 -> bf16 is one cheap copy


@dataclass
class Int8Weights:
    """Symmetric per-row int8 in plain form: w[n, k] = weight[n, k] · scale[n]. Indexed by output row first,
    like `Int4Weights`, so the loader's row operations (Llama GGUF's q/k un-permutation, fusing q/k/v
    pieces) apply to it via `map_rows` / `cat`."""

    weight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # [N], in the kernel's scale dtype

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int8Weights:
        return Int8Weights(fn(self.weight), fn(self.scale))

    @staticmethod
    def cat(parts: list[Int8Weights]) -> Int8Weights:
        assert len({p.scale.dtype for p in parts}) == 1, "pieces of one weight share a scale dtype"
        return Int8Weights(torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, scale = max|W[row]| / 127 (ChatGLM's formula): (int8 [N, K], scale [N]).

    The scale is rounded to `scale_dtype` *before* rounding the weights, so the codes are chosen against
    the scale the kernel will actually multiply by."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    tiny = torch.finfo(scale_dtype).tiny
    for rows in row_slices(weight.shape[0], weight.shape[1]):
        w = weight[rows].float()
        s = (w.abs().amax(dim=1) / 127).clamp_(min=tiny).to(scale_dtype)
        scale[rows] = s
        q[rows].copy_(torch.div(w, s.float()[:, None]).round_().clamp_(-127, 127))
    return q, scale


LANE_BLOCK = 32  # inputs per block of the int8 lane layout (native/int8_lanes.h)


def int8_to_lanes(weight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> the lane layout the VNNI kernel reads (native/int8_lanes.h): per tile of 16 rows and
    32-input block, dword j of the 16 rows side by side, each byte w + 128 (kept as an int8 [N, K] tensor, so
    shapes and dtypes read as before: a permutation and a flip of the same bytes)."""
    n, k = weight.shape
    tiles = weight.view(n // LANE_TILE, LANE_TILE, k // LANE_BLOCK, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    return tiles.view(n, k).view(torch.uint8).bitwise_xor_(0x80).view(torch.int8)


def int8_from_lanes(lanes: torch.Tensor) -> torch.Tensor:
    """The inverse of `int8_to_lanes`."""
    n, k = lanes.shape
    rows = lanes.view(n // LANE_TILE, k // LANE_BLOCK, 8, LANE_TILE, 4).permute(0, 3, 1, 2, 4).contiguous()
    return rows.view(n, k).view(torch.uint8).bitwise_xor_(0x80).view(torch.int8)


class Int8Linear(NativeLinear, nn.Module):
    """y = (x @ weight.T) · weight_scale + bias, weight int8 [out, in], one scale per output row."""

    _kernel, _scales = "int8_linear", "weight_scale"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.lanes = False  # weight in lane layout (`use_lanes`)
        weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = bias_parameter(bias, out_features, dtype, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dtype: torch.dtype | None = None) -> Int8Linear:
        w = linear.weight.detach()
        dtype = dtype or kernel_dtype(w.device, w.dtype)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=dtype,
                     device=w.device)
        module.weight, module.weight_scale = quantize_int8(w, dtype)
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()  # bias keeps the model dtype
        return module

    @classmethod
    def from_weights(cls, weights: Int8Weights, *, bias: torch.Tensor | None = None, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> Int8Linear:
        """The module holding `weights` (scales in `dtype`) on `device` (meta: shapes only)."""
        n, k = weights.weight.shape
        module = cls(k, n, bias is not None, dtype=dtype, device=device)
        module.weight = weights.weight.to(device).contiguous()
        module.weight_scale = weights.scale.to(device=device, dtype=dtype)
        if bias is not None:
            module.bias.data = bias.to(device).clone()
        return module

    def use_lanes(self) -> None:
        """Where the VNNI path is on (a CPU with AVX512-VNNI, and not GLMSTACK_VNNI=0), the weight goes to the
        lane layout, which that kernel reads as 16 outputs per vector: ~1.5x faster at one row (decode) on
        real-size heads. quantize_model calls it for every int8 linear but a head tied to the embedding (whose
        rows the embedding looks up in row layout)."""
        nk = native.kernels()
        n, k = self.weight.shape
        if (self.lanes or self.weight.device.type != "cpu" or nk is None or nk.activation_path() != "vnni"
                or n % LANE_TILE or k % LANE_BLOCK):
            return
        self.weight = self.weight.contiguous()
        permute_tiles_in_place((self.weight,), lambda w: (int8_to_lanes(w),), LANE_TILE)
        self.lanes, self._kernel = True, "int8_linear_lanes"

    def row_weight(self) -> torch.Tensor:
        """The int8 [N, K] weight in row layout, as checkpoints store it (a copy when held in lane layout)."""
        return int8_from_lanes(self.weight) if self.lanes else self.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scale_dtype={self.weight_scale.dtype}")

    def native_ready(self, x2: torch.Tensor) -> bool:
        # Any number of rows on the VNNI path (one numerics for decode and prompts); on fp32 activations the
        # kernel is a GEMV, and prompts are faster dequantized.
        rows_ok = x2.shape[0] <= NATIVE_MAX_ROWS or (self.in_features % 32 == 0 and native.vnni_rows())
        return (rows_ok and x2.is_cpu and self.weight.is_cpu and x2.dtype in NATIVE_DTYPES
                and self.weight_scale.dtype in NATIVE_DTYPES and self.weight.is_contiguous()
                and (self.bias is None or self.bias.dtype in NATIVE_DTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times per token: every buffer lookup and no-op `.to` costs ~1.5 µs.
        x2 = x.reshape(-1, self.in_features)
        weight, scale = self.weight, self.weight_scale
        nk = native.kernels() if weight.is_cpu else None
        if nk is not None and self.native_ready(x2):
            y = getattr(nk, self._kernel)(x2.contiguous(), weight, scale, self.bias)  # bias included, x's dtype
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        if self.lanes:  # the native kernels switched off since: row layout, per call
            weight = self.row_weight()
        if weight.is_cpu and x2.shape[0] < DEQUANT_MIN_ROWS and self.in_features % 16 == 0:
            if weight.data_ptr() % 64:  # e.g. after load_state_dict(assign=True) from a mapped file
                weight = aligned(weight)
                if not self.lanes:
                    self.weight = weight
            xk = x2 if x2.dtype == scale.dtype else x2.to(scale.dtype)
            y = torch.ops.aten._weight_int8pack_mm(aligned(xk), weight, scale)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            y = self._dequantized_matmul(x2, weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _dequantized_matmul(self, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = self.weight_scale.dtype if x2.device.type == "cpu" else x2.dtype
        xk = x2.to(dtype)
        outs = []
        for rows in row_slices(self.out_features, self.in_features):
            w = weight[rows]
            w_deq = scratch_buffer(w.numel(), dtype, w.device).view(w.shape).copy_(w)
            outs.append(F.linear(xk, w_deq) * self.weight_scale[rows].to(dtype))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.to(x2.dtype)


