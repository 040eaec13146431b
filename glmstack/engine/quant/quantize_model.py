"""Weight-only int8 / int4 linears and `quantize_model()`.

Batch-1 decode reads every weight once per token, so it runs at weight bytes / memory bandwidth: fewer bytes
per weight is speed, not only memory.

On x86 CPUs with AVX-512, decode-sized inputs (up to `NATIVE_MAX_ROWS` rows) go to our own kernels
(glmstack/engine/native: fp32 accumulation, fp32 or bf16 activations, 30-40 GB/s on 2 cores against 6-9 GB/s
for ATen's), and `Int4Linear` then stores its nibbles in that kernel's layout (`pack_int4_native`; prompts
dequantize from it). Everywhere else — no AVX-512, no compiler, GLMSTACK_NATIVE=0, GPUs — the kernels are
PyTorch's own "tinygemm" ops:

- int8 (`Int8Linear`): `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`, symmetric per output
  row — ChatGLM's W8A16 scheme (spec 7.2), with its state-dict names (`weight`, `weight_scale`). x and scales
  must share a dtype. On x86 only bf16 is vectorised (fp32/fp16 run a scalar loop, ~12x slower), and the
  AVX-512 loop reads x and w with *aligned* 16-element loads: K must be a multiple of 16 and x's data
  32-byte aligned (we keep 64), or the process segfaults — hence the checks below. The CUDA version is a
  naive one-thread-per-output kernel, so on GPUs we dequantize and call cuBLAS instead.
- int4 (`Int4Linear`): group-wise asymmetric, `w = (q - 8) * scale + zero` with q in 0..15 and
  `scales_and_zeros` [K/group, N, 2] (zero = min + 8·scale, torchao's convention), group 32/64/128/256.
  CPU: `_convert_weight_to_int4pack_for_cpu(int32 [N, K], 1)` → uint8 [N, K/2] in a layout that depends on
  the CPU's vector width, then `_weight_int4pack_mm_for_cpu`; needs N % 16 == 0 and K % group == 0; only
  bf16 is vectorised. CUDA: `_convert_weight_to_int4pack(uint8 [N, K/2], inner_k_tiles)` with the even
  element in the high nibble → int32 [N/8, K/(16·tiles), 32, tiles/2], then `_weight_int4pack_mm`; bf16
  only, sm80+, N % 8 == 0, K % 32 == 0. Packed weights are device- (and CPU-capability-) specific:
  quantize on the device the model runs on.

The fused CPU kernels dequantize per 4-row tile, so for prompts (many rows) they are ~9x slower than a bf16
GEMM (which uses AMX where present). From `DEQUANT_MIN_ROWS` (int8) / `INT4_DEQUANT_MIN_ROWS` (int4) rows
on, weights are dequantized a slice at a time into a reused scratch buffer and multiplied by that GEMM.
On CPU the quantized linears compute in bf16 whatever the model dtype (activations are cast at the
boundary): that is where the fast kernels are.

Which modules: every `nn.Linear` inside a decoder layer, plus the output head (unless `quantize_head=False`).
Embeddings, norms and biases stay as they are. A tied head gets its own quantized copy; the embedding is
never touched. Linears a kernel cannot take (shapes) stay unquantized and are listed in the report.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from glmstack.engine import native

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
# Group 32 (as GGUF Q4_0/Q4_1): 0.625 bytes per weight against 0.53 for group 128, so ~18% more to read on
# the native kernel's AVX512-VNNI path, which runs at memory bandwidth (its fp32 path is compute-bound: no
# slower). On the bundled SmolLM2 (a Q4_1 GGUF) group 32 reproduces the file's own grid (KL 0.005 to bf16)
# where group 128 requantizes it (KL 0.38, perplexity 53 -> 78).
DEFAULT_GROUP_SIZE = 32
# From this many activation rows on, dequantize-then-GEMM beats the fused CPU kernels (measured with
# benchmarks/bench_quant_kernels.py --m N on AVX-512 + AMX); decode (a row per sequence) takes the fused ones.
DEQUANT_MIN_ROWS = 16  # int8: converting int8 -> bf16 is one cheap copy
INT4_DEQUANT_MIN_ROWS = 64  # int4: unpacking the nibbles costs ~2x the bf16 GEMM of 128 rows
# Our native kernels (glmstack/engine/native, AVX-512) take up to this many rows, for both widths; above,
# dequantize-then-GEMM (AMX) wins.
NATIVE_MAX_ROWS = 32
# The int4 kernel (int8 activations, VNNI) re-expands the nibbles for every 4 rows of activations: at 16
# rows it is level with dequantize + GEMM on the bundled model's shapes, and beyond it loses
# (`bench_quant_kernels.py --m 8/16/24`). Up to 16 rows, a 16-stream decode step stays one fused native pass.
INT4_NATIVE_MAX_ROWS = 16
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_CHUNK_ELEMENTS = 1 << 24  # weights dequantized (or quantized) per slice: bounds the temporary to 32 MB bf16
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")  # module names inside a decoder layer (as in inspect.py)


# ---- quantization math ---------------------------------------------------------------------------------


def _row_slices(rows: int, row_length: int, multiple: int = 1) -> Iterator[slice]:
    """Row ranges of about `_CHUNK_ELEMENTS` weights, each starting on a multiple of `multiple`."""
    step = max(multiple, _CHUNK_ELEMENTS // max(row_length, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, scale = max|W[row]| / 127 (ChatGLM's formula): (int8 [N, K], scale [N]).

    The scale is rounded to `scale_dtype` *before* rounding the weights, so the codes are chosen against
    the scale the kernel will actually multiply by."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    tiny = torch.finfo(scale_dtype).tiny
    for rows in _row_slices(weight.shape[0], weight.shape[1]):
        w = weight[rows].float()
        s = (w.abs().amax(dim=1) / 127).clamp_(min=tiny).to(scale_dtype)
        scale[rows] = s
        q[rows].copy_(torch.div(w, s.float()[:, None]).round_().clamp_(-127, 127))
    return q, scale


@dataclass
class Int4Weights:
    """Group-wise asymmetric int4 in plain row-major form: w[n, k] = (codes[n, k] - 8) · scales[n, k // g]
    + zeros[n, k // g], codes in 0..15. Everything is indexed by output row first, so the loader's row
    operations (Llama GGUF's q/k un-permutation, fusing q/k/v pieces) apply to it via `map_rows` / `cat`."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group_size]
    zeros: torch.Tensor  # float32 [N, K // group_size]
    group_size: int

    def map_rows(self, fn) -> Int4Weights:  # type: ignore[no-untyped-def]
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
    for rows in _row_slices(n, k):
        w = weight[rows].float().view(-1, k // group_size, group_size)
        lo, hi = torch.aminmax(w, dim=-1)
        # Round scale and zero to what the kernel will hold first, then choose codes against those.
        s = ((hi - lo) / 15).clamp_(min=1e-6).to(scale_dtype).float()
        z = (lo + 8 * s).to(scale_dtype).float()
        q = torch.sub(w, z[..., None]).div_(s[..., None]).add_(8).round_().clamp_(0, 15)
        codes[rows].copy_(q.view(-1, k))
        scales[rows], zeros[rows] = s, z
    return Int4Weights(codes, scales, zeros, group_size)


def pack_int4_native(weights: Int4Weights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel's layout: uint8 [N, K/2], 16 bytes per 32 inputs (input j in the low nibble, j + 16
    in the high one, as GGUF Q4 blocks), and scales/zeros [N, 2, K/group] (each row's scales, then its
    zeros) in `dtype`."""
    n, k = weights.codes.shape
    c = weights.codes.view(n, k // 32, 2, 16)
    packed = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    sz = torch.stack([weights.scales, weights.zeros], dim=1).to(dtype=dtype, device=packed.device)
    return packed, sz.contiguous()


# ---- scratch space for dequantized weight slices ---------------------------------------------------------

_scratch = threading.local()  # per thread: two forwards on different threads must not share a buffer


def _scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer: allocating (and page-faulting) a fresh 32 MB tensor per call costs more than the
    int8→bf16 conversion itself on CPU."""
    buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor]
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first needed under inference_mode (the runner), so a later call outside
        # it (tests, `model.chat`) may still write into it
        with torch.inference_mode(False):
            buf = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with 64-byte aligned data (the AVX-512 int8 kernel uses aligned loads; fresh CPU
    allocations are 64-byte aligned)."""
    if x.is_contiguous() and x.data_ptr() % 64 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


# ---- modules ---------------------------------------------------------------------------------------------


class _NativeKernel:
    """What Int8Linear and Int4Linear share on the native kernels: `_kernel` names the kernel in
    glmstack/engine/native, `_scales` the attribute holding its scales; `native_ready` is each class's own."""

    _kernel: str
    _scales: str
    weight: torch.Tensor
    bias: torch.Tensor | None

    def native_ready(self, x2: torch.Tensor) -> bool:
        raise NotImplementedError

    def native_forward(self, x2: torch.Tensor, *, norm: nn.Module | None = None, silu_mul: bool = False,
                       residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """y = self(x2) on the native kernel, with the input transform and the residual add fused in:
        `norm` (an RMSNorm with `weight` and `eps`) normalizes x2 first; `silu_mul` takes x2 = [gate | up]
        ([M, 2·in_features]) and uses silu(gate)·up; `residual` ([M, out]) is added to the result. Returns None
        where the native kernel can't run (see `native_ready`); the caller then takes the module path."""
        nk = native.kernels()
        if nk is None or not self.native_ready(x2):
            return None
        return getattr(nk, self._kernel)(x2.contiguous(), self.weight, getattr(self, self._scales), self.bias,
                                         None if norm is None else norm.weight,
                                         0.0 if norm is None else norm.eps, silu_mul, residual)

    def native_args(self) -> tuple:
        """(kernel, weight, scales, bias): kernel(x, weight, scales, bias, norm_weight, eps, silu_mul,
        residual) is `native_forward` without its checks, for the fused decode loop."""
        nk = native.kernels()
        assert nk is not None
        return getattr(nk, self._kernel), self.weight, getattr(self, self._scales), self.bias


class Int8Linear(_NativeKernel, nn.Module):
    """y = (x @ weight.T) · weight_scale + bias, weight int8 [out, in], one scale per output row."""

    _kernel, _scales = "int8_linear", "weight_scale"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = _bias(bias, out_features, dtype, device)

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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scale_dtype={self.weight_scale.dtype}")

    def native_ready(self, x2: torch.Tensor) -> bool:
        return (x2.is_cpu and self.weight.is_cpu and x2.shape[0] <= NATIVE_MAX_ROWS and x2.dtype in _NATIVE_DTYPES
                and self.weight_scale.dtype in _NATIVE_DTYPES and self.weight.is_contiguous()
                and (self.bias is None or self.bias.dtype in _NATIVE_DTYPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times per token: every buffer lookup and no-op `.to` costs ~1.5 µs.
        x2 = x.reshape(-1, self.in_features)
        weight, scale = self.weight, self.weight_scale
        nk = native.kernels() if weight.is_cpu else None
        if nk is not None and self.native_ready(x2):
            y = nk.int8_linear(x2.contiguous(), weight, scale, self.bias)  # bias included, x's dtype
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        if weight.is_cpu and x2.shape[0] < DEQUANT_MIN_ROWS and self.in_features % 16 == 0:
            if weight.data_ptr() % 64:  # e.g. after load_state_dict(assign=True) from a mapped file
                weight = self.weight = _aligned(weight)
            xk = x2 if x2.dtype == scale.dtype else x2.to(scale.dtype)
            y = torch.ops.aten._weight_int8pack_mm(_aligned(xk), weight, scale)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            y = self._dequantized_matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def _dequantized_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        dtype = self.weight_scale.dtype if x2.device.type == "cpu" else x2.dtype
        xk = x2.to(dtype)
        outs = []
        for rows in _row_slices(self.out_features, self.in_features):
            w = self.weight[rows]
            w_deq = _scratch_buffer(w.numel(), dtype, w.device).view(w.shape).copy_(w)
            outs.append(F.linear(xk, w_deq) * self.weight_scale[rows].to(dtype))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y.to(x2.dtype)


class Int4Linear(_NativeKernel, nn.Module):
    """Group-wise int4 linear on PyTorch's tinygemm kernels; `weight` is in the kernel's packed layout."""

    _kernel, _scales = "int4_linear", "scales_and_zeros"

    def __init__(self, in_features: int, out_features: int, bias: bool, *, group_size: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        device = torch.device(device or "cpu")
        self.packed_for = device.type
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8, device=device))  # from_weights packs
        sz = torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device)
        self.register_buffer("scales_and_zeros", sz)
        self.bias = _bias(bias, out_features, dtype, device)

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
                     dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> Int4Linear:
        """Pack `weights` for `device`. Raises ValueError for shapes the kernel cannot take
        (`int4_unsupported_reason` says which)."""
        device = torch.device(device)
        n, k = weights.codes.shape
        reason = int4_unsupported_reason(n, k, weights.group_size, device)
        if reason:
            raise ValueError(f"cannot pack a {n}x{k} int4 weight for {device.type}: {reason}")
        module = cls(k, n, bias is not None, group_size=weights.group_size, dtype=dtype, device=device)
        codes = weights.codes.to(device)
        if device.type == "cpu" and native.available():
            # Our kernel's layout: 16 bytes per 32 inputs (input j in the low nibble, j + 16 in the high one),
            # scales and zeros row-major [N, K/group, 2].
            module.packed_for = "cpu-native"
            module.weight, module.scales_and_zeros = pack_int4_native(weights, dtype)
            if bias is not None:
                module.bias.data = bias.to(device).clone()
            return module
        if device.type == "cuda":
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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"scale_dtype={self.scales_and_zeros.dtype}")

    def native_ready(self, x2: torch.Tensor) -> bool:
        return (self.packed_for == "cpu-native" and x2.is_cpu and x2.shape[0] <= INT4_NATIVE_MAX_ROWS
                and x2.dtype in _NATIVE_DTYPES and (self.bias is None or self.bias.dtype in _NATIVE_DTYPES))

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
            y = nk.int4_linear(x2.contiguous(), self.weight, self.scales_and_zeros, self.bias)
        elif nk is not None and self.scales_and_zeros.dtype == torch.bfloat16:  # a prompt: bf16 GEMM
            w = nk.int4_dequantize(self.weight, self.scales_and_zeros)
            y = F.linear(x2.to(torch.bfloat16), w)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:  # fp32 scales (exact), or the native kernels switched off since packing: slice by slice
            dtype = self.scales_and_zeros.dtype
            xk = x2.to(dtype)
            n, k, g = self.out_features, self.in_features, self.group_size
            outs = []
            for rows in _row_slices(n, k):
                width = rows.stop - rows.start
                w = _scratch_buffer(width * k, dtype, x2.device).view(width, k // 32, 2, 16)
                packed = self.weight[rows].view(width, k // 32, 1, 16)
                w[:, :, 0:1].copy_(packed & 15)
                w[:, :, 1:2].copy_(packed >> 4)
                scale, zero = self.scales_and_zeros[rows].unbind(1)  # [rows, K/g] each
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
        for rows in _row_slices(n, k, multiple=layout[0]):  # slices start on packing-block boundaries
            width = rows.stop - rows.start
            # Dequantize W^T [K, rows]: the packed blocks are stored K-major, and so are the scales.
            wt = _scratch_buffer(k * width, xk.dtype, xk.device).view(k, width)
            _unpack_int4_cpu(self.weight.view(-1)[rows.start * k // 2 : rows.stop * k // 2], wt, layout)
            sz = self.scales_and_zeros[:, rows].float()  # [K/g, rows, 2]
            # w = q·scale + shift in one pass, all operands in the scratch dtype (mixed dtypes: ~10x slower)
            scale = sz[:, None, :, 0].to(xk.dtype)
            shift = (sz[..., 1] - 8 * sz[..., 0])[:, None].to(xk.dtype)
            grouped = wt.view(k // g, g, width)
            torch.addcmul(shift, grouped, scale, out=grouped)
            outs.append(xk @ wt)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _bias(present: bool, n: int, dtype: torch.dtype,
          device: torch.device | str | None) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False) if present else None


def kernel_dtype(device: torch.device, model_dtype: torch.dtype, bits: int = 8) -> torch.dtype:
    """The dtype quantized linears compute in: bf16 on CPU (the only vectorised tinygemm path) and for the
    CUDA int4 kernel (bf16 only); the model's own dtype for int8 on GPUs (dequantize + cuBLAS)."""
    if device.type == "cpu" or bits == 4:
        return torch.bfloat16
    return model_dtype


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


# ---- reading the CPU int4 packed layout back (for the prompt path) -----------------------------------------

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


# ---- weights that arrive already quantized ----------------------------------------------------------------


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


# ---- whole models -----------------------------------------------------------------------------------------


@dataclass
class QuantizationReport:
    bits: int
    group_size: int | None
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it stayed unquantized
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        mb = 1024 * 1024
        kind = "no quantization" if not self.bits else f"int{self.bits}"
        return (f"{kind}: {len(self.quantized)} linears quantized, {len(self.skipped)} kept, "
                f"{self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (a tied head is shared)."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
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
    prequantized: Mapping[str, Int4Weights] | None = None,
) -> QuantizationReport:
    """Replace the decoder layers' linears (and the output head) with `Int8Linear` (bits=8) or `Int4Linear`
    (bits=4) in place. bits=0 does nothing; a second call logs "already quantized" and changes nothing.

    int4 uses `group_size` (32/64/128/256) where it divides a linear's input size, else the largest smaller
    one that does. The head is int8 for bits=4 too: on the bundled SmolLM2 an int4 head raises the KL to the
    bf16 model from 0.005 to 0.054 (top-1 agreement 0.95 -> 0.83); llama.cpp's 4-bit presets likewise keep
    output.weight at 6 bits. `prequantized` maps module names to weights that arrived quantized (GGUF
    Q4_0/Q4_1 via `int4_weights_from_gguf`), used as they are whatever `bits` says.
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
    head = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
    # With `prequantized`, the loader may have left those linears' float weights on the meta device.
    device = next(t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    prequantized = dict(prequantized or {})
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (_LAYER.search(name) or (quantize_head and name == head))]
    for name, linear in targets:
        module_bits = 8 if name == head else bits  # see the docstring
        new = _quantized(name, linear, module_bits, group_size, prequantized.pop(name, None), device, report)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.quantized.append(name)
    if prequantized:
        raise ValueError(f"prequantized weights for modules that are not quantized linears: "
                         f"{sorted(prequantized)}")
    model.quantization = f"int{bits}"
    report.bytes_after = model_bytes(model)
    log.info("%s", report)
    return report


def _quantized(name: str, linear: nn.Linear, bits: int, group_size: int, ready: Int4Weights | None,
               device: torch.device, report: QuantizationReport) -> nn.Module | None:
    bias = None if linear.bias is None else linear.bias.detach()
    if ready is not None:
        dtype = kernel_dtype(device, linear.weight.dtype, bits=4)
        return Int4Linear.from_weights(ready, bias=bias, dtype=dtype, device=device)
    if bits == 8:
        return Int8Linear.from_linear(linear)
    n, k = linear.out_features, linear.in_features
    dtype = kernel_dtype(device, linear.weight.dtype, bits=4)
    sizes = [g for g in INT4_GROUP_SIZES if g <= group_size and k % g == 0]
    if not sizes:
        reason = f"in_features {k} is not a multiple of 32"
    else:
        reason = int4_unsupported_reason(n, k, sizes[-1], device)
    if reason:
        log.debug("keeping %s unquantized: %s", name, reason)
        report.skipped[name] = reason
        return None
    if sizes[-1] != group_size:
        log.debug("%s: in_features %d needs group size %d instead of %d", name, k, sizes[-1], group_size)
    return Int4Linear.from_linear(linear, group_size=sizes[-1], dtype=dtype)
