"""Weight-only int4: `Int4Linear`.

Group-wise asymmetric, `w = (q - 8) * scale + zero` with q in 0..15 and `scales_and_zeros` [K/group, N, 2]
(zero = min + 8·scale, torchao's convention), group 32/64/128/256. Off the native kernels, PyTorch's
tinygemm ops. CPU: `_convert_weight_to_int4pack_for_cpu(int32 [N, K], 1)` → uint8 [N, K/2] in a layout that
depends on the CPU's vector width, then `_weight_int4pack_mm_for_cpu`; needs N % 16 == 0 and K % group == 0; only
bf16 is vectorised. CUDA: `_convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` with the even
element in the high nibble → int32 [N/8, K/(16·tiles), 32, tiles/2], then `_weight_int4pack_mm`; bf16
only, sm80+, N % 8 == 0, K % 32 == 0. Packed weights are device- (and CPU-capability-) specific:
quantize on the device the model runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine import native
from glmstack.engine.quant.linear_base import (
    LANE_TILE,
    NATIVE_DTYPES,
    NativeLinear,
    bias_parameter,
    kernel_dtype,
    permute_tiles_in_place,
    row_slices,
    scratch_buffer,
)

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)


# Group 32 (as GGUF Q4_0/Q4_1): 0.625 bytes per weight against 0.53 for group 128, so ~18% more to read on
# the native kernel's AVX512-VNNI path, which runs at memory bandwidth (its fp32 path is compute-bound: no
# slower). On the bundled SmolLM2 (a Q4_1 GGUF) group 32 reproduces the file's own grid (KL 0.005 to bf16)
# where group 128 requantizes it (KL 0.38, perplexity 53 -> 78).
DEFAULT_GROUP_SIZE = 32


INT4_DEQUANT_MIN_ROWS = 64  # int4: unpacking the nibbles costs ~2x the bf16 GEMM of 128 rows


# The native kernel's fp32-activation path (no VNNI, or GLMSTACK_VNNI=0) takes up to this many rows; prompts
# dequantize + GEMM. Its VNNI path takes every row count (see `native_ready`).
INT4_NATIVE_MAX_ROWS = 16


@dataclass
class Int4Weights:
    """Group-wise asymmetric int4 in plain row-major form: w[n, k] = (codes[n, k] - 8) · scales[n, k // g]
    + zeros[n, k // g], codes in 0..15. Everything is indexed by output row first, so the loader's row
    operations (Llama GGUF's q/k un-permutation, fusing q/k/v pieces) apply to it via `map_rows` / `cat`."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor  # float32 [N, K // group_size]
    group_size: int

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Weights:
        return Int4Weights(fn(self.codes), fn(self.scales), fn(self.zeros), self.group_size)

    @staticmethod
    def cat(parts: list[Int4Weights]) -> Int4Weights:
        assert len({p.group_size for p in parts}) == 1, "pieces of one weight share a group size"
        return Int4Weights(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), parts[0].group_size)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group_size
        codes = self.codes.view(n, k // g, g).float() - 8
        return (codes * self.scales[..., None] + self.zeros[..., None]).view(n, k)


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> Int4Weights:
    """Min/max asymmetric int4 per group of `group_size` inputs (torchao's / gpt-fast's scheme)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    codes = torch.empty(n, k, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group_size, device=weight.device)
    zeros = torch.empty_like(scales)
    for rows in row_slices(n, k):
        w = weight[rows].float().view(-1, k // group_size, group_size)
        lo, hi = torch.aminmax(w, dim=-1)
        # Round scale and zero to what the kernel will hold first, then choose codes against those.
        s = ((hi - lo) / 15).clamp_(min=1e-6).to(scale_dtype).float()
        z = (lo + 8 * s).to(scale_dtype).float()
        q = torch.sub(w, z[..., None]).div_(s[..., None]).add_(8).round_().clamp_(0, 15)
        codes[rows].copy_(q.view(-1, k))
        scales[rows], zeros[rows] = s, z
    return Int4Weights(codes, scales, zeros, group_size)


@dataclass
class PackedInt4:
    """Int4 weights already in the native CPU kernel's layout (`pack_int4_native`'s output)."""

    packed: torch.Tensor  # uint8 [N, K/2]
    scales_and_zeros: torch.Tensor  # [N, 2, K/group]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], 2 * self.packed.shape[1]


def quantize_int4_packed(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> PackedInt4:
    """`quantize_int4` then `pack_int4_native`, a slice of rows at a time: the plain form's one byte per weight
    never exists for the whole tensor (for a 151,552 x 4,096 embedding, 620 MB of codes)."""
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    sz = torch.empty(n, 2, k // group_size, dtype=scale_dtype)
    for rows in row_slices(n, k):
        packed[rows], sz[rows] = pack_int4_native(quantize_int4(weight[rows], group_size, scale_dtype), scale_dtype)
    return PackedInt4(packed, sz, group_size)


def pack_int4_native(weights: Int4Weights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel's layout: uint8 [N, K/2], 16 bytes per 32 inputs (input j in the low nibble, j + 16
    in the high one, as GGUF Q4 blocks), and scales/zeros [N, 2, K/group] (each row's scales, then its
    zeros) in `dtype`."""
    n, k = weights.codes.shape
    c = weights.codes.view(n, k // 32, 2, 16)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    sz = torch.stack([weights.scales, weights.zeros], dim=1).to(dtype=dtype, device=packed.device)
    return packed, sz.contiguous()


def int4_to_lanes(packed: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_int4_native`'s row layout -> the lane layout the VNNI kernel reads without unpacking
    (native/int4_lanes.h): per tile of 16 rows and per 32-input block, dword j of the 16 rows side by side;
    scales and zeros per tile as [2, K/group, 16]. Same shapes, same bytes: a permutation."""
    n, half = packed.shape
    groups = sz.shape[2]
    tiles = n // LANE_TILE
    return (packed.view(tiles, LANE_TILE, half // 16, 4, 4).permute(0, 2, 3, 1, 4).contiguous().view(n, half),
            sz.view(tiles, LANE_TILE, 2, groups).permute(0, 2, 3, 1).contiguous().view(n, 2, groups))


def int4_from_lanes(packed: torch.Tensor, sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `int4_to_lanes`."""
    n, half = packed.shape
    groups = sz.shape[2]
    tiles = n // LANE_TILE
    return (packed.view(tiles, half // 16, 4, LANE_TILE, 4).permute(0, 3, 1, 2, 4).contiguous().view(n, half),
            sz.view(tiles, 2, groups, LANE_TILE).permute(0, 3, 1, 2).contiguous().view(n, 2, groups))


class Int4Linear(NativeLinear, nn.Module):
    """Group-wise int4 linear on PyTorch's tinygemm kernels; `weight` is in the kernel's packed layout."""

    _kernel, _scales = "int4_linear", "scales_and_zeros"
    scales_and_zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, *, group_size: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        device = torch.device(device or "cpu")
        self.packed_for = device.type
        self.lanes = False  # weight and scales_and_zeros in lane layout (`use_lanes`)
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))  # from_weights packs
        sz = torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device)
        self.register_buffer("scales_and_zeros", sz)
        self.bias = bias_parameter(bias, out_features, dtype, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int,
                    dtype: torch.dtype | None = None) -> Int4Linear:
        w = linear.weight.detach()
        reason = int4_unsupported_reason(*w.shape, group_size, w.device)
        if reason:
            raise ValueError(f"cannot quantize a {w.shape[0]}x{w.shape[1]} linear to int4: {reason}")
        dtype = dtype or kernel_dtype(w.device, w.dtype, bits=4)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weights(quantize_int4(w, group_size, dtype), bias=bias, dtype=dtype, device=w.device)

    @classmethod
    def from_weights(cls, weights: Int4Weights, *, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                     for_device: torch.device | str | None = None) -> Int4Linear:
        """Pack `weights` for `device`. Raises ValueError for shapes the kernel cannot take
        (`int4_unsupported_reason` says which). `for_device` packs for that device's kernels while the tensors
        go to `device`: with device "meta", the module holds exactly the shapes and dtypes it would there (how
        `quantize_model` counts a model on the meta device)."""
        device = torch.device(device)
        target = device if for_device is None else torch.device(for_device)
        n, k = weights.codes.shape
        reason = int4_unsupported_reason(n, k, weights.group_size, target)
        if reason:
            raise ValueError(f"cannot pack a {n}x{k} int4 weight for {target.type}: {reason}")
        module = cls(k, n, bias is not None, group_size=weights.group_size, dtype=dtype, device=device)
        module.packed_for = target.type
        codes = weights.codes.to(device)
        if target.type == "cpu" and native.available():
            # Our kernel's layout: 16 bytes per 32 inputs (input j in the low nibble, j + 16 in the high one),
            # scales and zeros row-major [N, K/group, 2].
            module.packed_for = "cpu-native"
            module.weight, module.scales_and_zeros = pack_int4_native(weights, dtype)
            if bias is not None:
                module.bias.data = bias.to(device).clone()
            module.use_lanes()
            return module
        if target.type == "cuda":
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()  # even element in the high nibble
            module.weight = torch.ops.aten._convert_weight_to_int4pack(packed, tiles)
        else:
            module.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        module.scales_and_zeros = torch.stack([weights.scales.t(), weights.zeros.t()], dim=-1).to(
            device=device, dtype=dtype).contiguous()
        if bias is not None:
            module.bias.data = bias.to(device).clone()
        return module

    @classmethod
    def from_native_packed(cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> Int4Linear:
        """A CPU module from weights already in the native kernel's layout (`pack_int4_native`'s output, as a
        quantized checkpoint stores them), without unpacking: no bias (the caller sets one). The module takes
        the tensors over (`use_lanes` rearranges them in place)."""
        n, half = packed.shape
        module = cls(2 * half, n, False, group_size=group_size, dtype=scales_and_zeros.dtype, device="cpu")
        module.packed_for = "cpu-native"
        module.weight, module.scales_and_zeros = packed.contiguous(), scales_and_zeros.contiguous()
        module.use_lanes()
        return module

    def use_lanes(self) -> None:
        """Native-layout weights go to the lane layout where the VNNI path is on (a CPU with AVX512-VNNI, and
        not GLMSTACK_VNNI=0), which reads it without unpacking: ~2x faster at one row (decode), the same bits.
        Kept in row layout elsewhere (the fp32 path, N not a multiple of 16, shapes only on the meta device)."""
        nk = native.kernels()
        if (self.lanes or self.packed_for != "cpu-native" or self.weight.device.type != "cpu" or nk is None
                or nk.activation_path() != "vnni" or self.out_features % LANE_TILE):
            return
        self.weight, self.scales_and_zeros = self.weight.contiguous(), self.scales_and_zeros.contiguous()
        permute_tiles_in_place((self.weight, self.scales_and_zeros), int4_to_lanes, LANE_TILE)
        self.lanes, self._kernel = True, "int4_linear_lanes"

    def row_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scales_and_zeros) in `pack_int4_native`'s row layout, as checkpoints store them (a copy
        when the module holds the lane layout)."""
        if self.lanes:
            return int4_from_lanes(self.weight, self.scales_and_zeros)
        return self.weight, self.scales_and_zeros

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"scale_dtype={self.scales_and_zeros.dtype}")

    def native_ready(self, x2: torch.Tensor) -> bool:
        # Any number of rows on the VNNI path (one numerics for decode and prompts: a prefix-cached prompt's
        # tail must compute what the cold prompt did); on fp32 activations prompts are faster dequantized.
        rows_ok = x2.shape[0] <= INT4_NATIVE_MAX_ROWS or native.vnni_rows()
        return (rows_ok and self.packed_for == "cpu-native" and x2.is_cpu
                and x2.dtype in NATIVE_DTYPES and (self.bias is None or self.bias.dtype in NATIVE_DTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_for == "cpu-native":
            return self._native_layout_forward(x)
        if x.is_cpu != (self.packed_for == "cpu"):
            raise RuntimeError(f"Int4Linear weights are packed for {self.packed_for}, the input is on "
                               f"{x.device.type}: quantize after moving the model to its device")
        x2 = x.reshape(-1, self.in_features)
        sz = self.scales_and_zeros
        xk = x2 if x2.dtype == sz.dtype else x2.to(sz.dtype)
        if not x2.is_cpu:
            y = torch.ops.aten._weight_int4pack_mm(xk.contiguous(), self.weight, self.group_size, sz)
        elif x2.shape[0] >= INT4_DEQUANT_MIN_ROWS and _cpu_int4_layout() is not None:
            y = self._dequantized_matmul(xk)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xk.contiguous(), self.weight, self.group_size, sz)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _native_layout_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            raise RuntimeError(f"Int4Linear weights are packed for cpu, the input is on {x.device.type}: "
                               "quantize after moving the model to its device")
        x2 = x.reshape(-1, self.in_features)
        nk = native.kernels()
        if nk is not None and self.native_ready(x2):
            y = getattr(nk, self._kernel)(x2.contiguous(), self.weight, self.scales_and_zeros, self.bias)
        elif nk is not None and self.scales_and_zeros.dtype == torch.bfloat16:  # a prompt: bf16 GEMM
            w = nk.int4_dequantize(*self.row_layout())
            y = F.linear(x2.to(torch.bfloat16), w)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:  # fp32 scales (exact), or the native kernels switched off since packing: slice by slice
            dtype = self.scales_and_zeros.dtype
            xk = x2.to(dtype)
            n, k, g = self.out_features, self.in_features, self.group_size
            weight, scales_and_zeros = self.row_layout()
            outs = []
            for rows in row_slices(n, k):
                width = rows.stop - rows.start
                w = scratch_buffer(width * k, dtype, x2.device).view(width, k // 32, 2, 16)
                packed = weight[rows].view(width, k // 32, 1, 16)
                w[:, :, 0:1].copy_(packed & 15)
                w[:, :, 1:2].copy_(packed >> 4)
                scale, zero = scales_and_zeros[rows].unbind(1)  # [rows, K/g] each
                grouped = w.view(width, k // g, g)
                # (q - 8)·scale + zero, in one pass on the scratch dtype
                shift = (zero.float() - 8 * scale.float()).to(dtype)[..., None]
                torch.addcmul(shift, grouped, scale[..., None], out=grouped)
                outs.append(F.linear(xk, w.view(width, k)))
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _dequantized_matmul(self, xk: torch.Tensor) -> torch.Tensor:
        layout = _cpu_int4_layout()
        assert layout is not None
        n, k, g = self.out_features, self.in_features, self.group_size
        outs = []
        for rows in row_slices(n, k, multiple=layout[0]):  # slices start on packing-block boundaries
            width = rows.stop - rows.start
            # Dequantize W^T [K, rows]: the packed blocks are stored K-major, and so are the scales.
            wt = scratch_buffer(k * width, xk.dtype, xk.device).view(k, width)
            _unpack_int4_cpu(self.weight.view(-1)[rows.start * k // 2 : rows.stop * k // 2], wt, layout)
            sz = self.scales_and_zeros[:, rows].float()  # [K/g, rows, 2]
            # w = q·scale + shift in one pass, all operands in the scratch dtype (mixed dtypes: ~10x slower)
            scale = sz[:, None, :, 0].to(xk.dtype)
            shift = (sz[..., 1] - 8 * sz[..., 0])[:, None].to(xk.dtype)
            grouped = wt.view(k // g, g, width)
            torch.addcmul(shift, grouped, scale, out=grouped)
            outs.append(xk @ wt)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def int4_unsupported_reason(n: int, k: int, group_size: int, device: torch.device) -> str | None:
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} is not one of {INT4_GROUP_SIZES}"
    if k % group_size:
        return f"in_features {k} is not a multiple of the group size {group_size}"
    if device.type == "cpu":
        return None if n % 16 == 0 else f"out_features {n} is not a multiple of 16"
    if device.type == "cuda":
        if n % 8 or k % 32:
            return f"the CUDA kernel needs out_features % 8 == 0 and in_features % 32 == 0 (got {n}, {k})"
        return None
    return f"no int4 kernel for device {device.type}"


_layout_cache: list[tuple[int, bool] | None] = []


def _cpu_int4_layout() -> tuple[int, bool] | None:
    """(rows per packing block, halves?) of `_convert_weight_to_int4pack_for_cpu` on this CPU, found by
    packing a probe and checking which candidate unpacks it exactly; None if none does (the prompt path then
    keeps the fused kernel). ATen packs blocks of 64 rows (AVX-512) or 32 (AVX2/scalar) as [K, rows/2]
    bytes; within a full vectorised block the low nibbles hold rows 0..B/2-1 and the high nibbles rows
    B/2..B-1; a partial last block (and the scalar build) pairs rows (2j low, 2j+1 high)."""
    if not _layout_cache:
        probe = torch.randint(0, 16, (144, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1)
        found = None
        for candidate in ((64, True), (32, True), (32, False), (64, False)):
            unpacked = torch.empty(64, 144, dtype=torch.uint8)
            _unpack_int4_cpu(packed.view(-1), unpacked, candidate)
            if torch.equal(unpacked.t(), probe):
                found = candidate
                break
        if found is None:
            log.warning("unknown int4 CPU packing layout: long prompts use the (slower) fused int4 kernel")
        _layout_cache.append(found)
    return _layout_cache[0]


def _unpack_int4_cpu(flat: torch.Tensor, out_t: torch.Tensor, layout: tuple[int, bool]) -> None:
    """Write the codes of packed rows (starting on a block boundary) transposed, as out_t [K, rows], in
    out_t's dtype. Copying block-wise into the transposed matrix keeps 32-element runs contiguous."""
    block, halves = layout
    k, n = out_t.shape
    full = n // block * block
    if full:
        a = flat[: full * k // 2].view(full // block, k, block // 2).transpose(0, 1)  # [K, blocks, B/2]
        dst = out_t[:, :full].view(k, full // block, 2, block // 2) if halves else \
            out_t[:, :full].view(k, full // block, block // 2, 2).transpose(2, 3)
        dst[:, :, 0].copy_(a & 15)
        dst[:, :, 1].copy_(a >> 4)
    if n > full:
        b = flat[full * k // 2 : n * k // 2].view(k, (n - full) // 2)
        dst = out_t[:, full:].view(k, (n - full) // 2, 2)
        dst[..., 0].copy_(b & 15)
        dst[..., 1].copy_(b >> 4)


