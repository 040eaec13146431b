"""What Int8Linear and Int4Linear share: the native-kernel mixin (`NativeLinear`), the dtype they compute in,
and the scratch space for dequantized weight slices."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from glmstack.engine import native

# Our native kernels (glmstack/engine/native, AVX-512) on fp32 activations take up to this many rows; above,
# dequantize-then-GEMM wins. On their VNNI path they take any number (`native.vnni_rows()`).
NATIVE_MAX_ROWS = 32


NATIVE_DTYPES = (torch.float32, torch.bfloat16)


_CHUNK_ELEMENTS = 1 << 24  # weights dequantized (or quantized) per slice: bounds the temporary to 32 MB bf16


def row_slices(rows: int, row_length: int, multiple: int = 1) -> Iterator[slice]:
    """Row ranges of about `_CHUNK_ELEMENTS` weights, each starting on a multiple of `multiple`."""
    step = max(multiple, _CHUNK_ELEMENTS // max(row_length, 1) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


LANE_TILE = 16  # output rows per tile of the kernels' lane layouts (native/int4_lanes.h, native/int8_lanes.h)


def permute_tiles_in_place(tensors: tuple[torch.Tensor, ...],
                           convert: Callable[..., tuple[torch.Tensor, ...]], tile_rows: int) -> None:
    """`tensors` (row-indexed alike) <- `convert(*tensors)`, a slice of rows at a time, for a `convert` that
    permutes bytes within tiles of `tile_rows` rows (the kernels' lane layouts: a tile occupies the same bytes
    in both layouts). A load then peaks at one slice more, not one tensor more (310 MB for GLM-4's head)."""
    rows = tensors[0].shape[0]
    for piece in row_slices(rows, max(t[0].numel() for t in tensors), multiple=tile_rows):
        for tensor, converted in zip(tensors, convert(*(t[piece] for t in tensors)), strict=True):
            tensor[piece].copy_(converted)


_scratch = threading.local()  # per thread: two forwards on different threads must not share a buffer


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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


def aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with 64-byte aligned data (the AVX-512 int8 kernel uses aligned loads; fresh CPU
    allocations are 64-byte aligned)."""
    if x.is_contiguous() and x.data_ptr() % 64 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


class NativeLinear:
    """What Int8Linear and Int4Linear share on the native kernels: `_kernel` names the kernel in
    glmstack/engine/native, `_scales` the attribute holding its scales; `native_ready` is each class's own."""

    _kernel: str
    in_features: int
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


def bias_parameter(present: bool, n: int, dtype: torch.dtype,
          device: torch.device | str | None) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(n, dtype=dtype, device=device), requires_grad=False) if present else None


def kernel_dtype(device: torch.device, model_dtype: torch.dtype, bits: int = 8) -> torch.dtype:
    """The dtype quantized linears compute in: bf16 on CPU (the only vectorised tinygemm path) and for the
    CUDA int4 kernel (bf16 only); the model's own dtype for int8 on GPUs (dequantize + cuBLAS)."""
    if device.type == "cpu" or bits == 4:
        return torch.bfloat16
    return model_dtype


