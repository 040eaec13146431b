"""GGUF block types in the engine's native int4/int8 forms: conversion error and dequantization speed.

    python benchmarks/bench_gguf_native.py [--rows 1024] [--cols 4096] [--threads 2] [--repeats 3]

Errors: an N(0, 1) [rows, cols] float32 matrix is quantized to each GGUF type by ggml's own reference
quantizers (the libggml that llama-cpp-python bundles, no imatrix; without it, the gguf package's quantizers
for the types it has), then converted by `native_weights_from_gguf` with bf16 scales. Prints relative RMS
errors: the GGUF type vs the fp32 source, our weights vs gguf's dequantization (the conversion's own error),
and our weights vs the fp32 source; for the int4-requantized types also the conversion error of plain
min/max (`quantize_int4`) without the least-squares refit. The figures in `native_weights_from_gguf`'s
docstring come from here.

Timings: a 4096x4096 tensor of random blocks, dequantized by the gguf package's numpy code and by
`dequantize_raw` (our torch dequantizers where we have one), and converted by `native_weights_from_gguf`;
the minimum of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import ctypes
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from bench_quant_kernels import time_us
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from glmstack.engine.loading.gguf_file import dequantize_raw
from glmstack.engine.quant.int4 import quantize_int4
from glmstack.engine.quant.int8 import quantize_int8
from glmstack.engine.quant.on_load import FIVE_BIT_BLOCKS
from glmstack.engine.quant.prequantized import GGUF_NATIVE_BITS, native_weights_from_gguf

Q = GGMLQuantizationType
# byte offsets of each type's fp16 scale fields: random blocks get sane values there
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,)}


def ggml_quantizer() -> Callable[[np.ndarray, GGMLQuantizationType], np.ndarray] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def quantize(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
        w = np.ascontiguousarray(w, dtype=np.float32)
        n, k = w.shape
        block, type_size = GGML_QUANT_SIZES[qtype]
        out = np.empty((n, k // block * type_size), dtype=np.uint8)
        lib.ggml_quantize_init(int(qtype))
        written = lib.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, n, k, None)
        assert written == out.size
        return out

    return quantize


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).square().mean() / b.square().mean()).sqrt())


def errors(rows: int, cols: int) -> None:
    source = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    quantize = ggml_quantizer()
    print(f"quantizer: {'libggml (llama-cpp-python)' if quantize else 'gguf package'}; N(0,1) {rows}x{cols}")
    print(f"{'type':7} -> form  type    conv    total   (conv, min/max int4)")
    forms = [*GGUF_NATIVE_BITS.items(), *((t, 4) for t in FIVE_BIT_BLOCKS)]  # and 5-bit in a 4-bit file
    for qtype, bits in forms:
        try:
            raw = quantize(source.numpy(), qtype) if quantize else gguf.quants.quantize(source.numpy(), qtype)
        except NotImplementedError:
            print(f"{qtype.name:7} -> int{bits}  (no quantizer for this type here)")
            continue
        oracle = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(rows, cols)
        ours = native_weights_from_gguf(raw, qtype, (rows, cols), bits=bits).dequantize()
        conv = rel_rms(ours, oracle)
        line = (f"{qtype.name:7} -> int{bits}  {rel_rms(oracle, source):.4f}  "
                f"{'exact ' if conv == 0 else f'{conv:.4f}'}  {rel_rms(ours, source):.4f}")
        if bits == 4 and conv:
            plain = quantize_int4(oracle, 32, torch.bfloat16).dequantize()
            line += f"  ({rel_rms(plain, oracle):.4f})"
        print(line)
    q, s = quantize_int8(source, torch.bfloat16)
    print(f"from the fp32 source: int4 group 32 (min/max) "
          f"{rel_rms(quantize_int4(source, 32, torch.bfloat16).dequantize(), source):.4f}, "
          f"per-row int8 {rel_rms(q.float() * s.float()[:, None], source):.4f}")


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    return time_us(fn, repeats) / 1e3


def timings(repeats: int) -> None:
    n = k = 4096
    rng = np.random.default_rng(0)
    print(f"\n{n}x{k}, ms (best of {repeats}), {torch.get_num_threads()} torch threads")
    print(f"{'type':7}  gguf-numpy  dequantize_raw  native_weights_from_gguf")
    for qtype in GGUF_NATIVE_BITS:
        block, type_size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (n * k // block, type_size), dtype=np.uint8)
        for offset in F16_FIELDS[qtype]:
            sane = (rng.random(len(raw)) * 0.1 + 1e-3).astype(np.float16)
            raw[:, offset : offset + 2] = sane.view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(n, -1)
        numpy_ms = time_ms(lambda: gguf.quants.dequantize(raw, qtype), repeats)  # noqa: B023
        torch_ms = time_ms(lambda: dequantize_raw(raw, qtype, (n, k)), repeats)  # noqa: B023
        native_ms = time_ms(lambda: native_weights_from_gguf(raw, qtype, (n, k)), repeats)  # noqa: B023
        print(f"{qtype.name:7}  {numpy_ms:10.0f}  {torch_ms:14.0f}  {native_ms:24.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    errors(args.rows, args.cols)
    timings(args.repeats)


if __name__ == "__main__":
    main()
