"""Weight-only quantized GEMV/GEMM kernels on this machine: which one moves weight bytes fastest.

    python benchmarks/bench_quant_kernels.py [--threads 2] [--m 1] [--repeats 30]

Batch-1 decode reads every weight once per token, so its speed is weight bytes / time. For each shape
(SmolLM2-135M's 576x1536 MLP both ways, and a 7B-class 4096x4096) this prints µs per call and weight bytes
moved per second for fp32 and bf16 `F.linear`, the fused `_weight_int8pack_mm` and int4 tinygemm kernels
(bf16 activations; int4 bytes count packed nibbles + bf16 scales/zeros), and our `Int8Linear` /
`Int4Linear`, which switch to dequantize-then-GEMM from `DEQUANT_MIN_ROWS` / `INT4_DEQUANT_MIN_ROWS` rows
on. Run with `--m 16`, `--m 128` to see prompt-sized GEMMs (GB/s is then only "weight bytes / time").
Times are the minimum of `--repeats` runs: on a shared machine the minimum is the least disturbed figure.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glmstack.engine import native
from glmstack.engine.quant.int4 import INT4_DEQUANT_MIN_ROWS, Int4Linear
from glmstack.engine.quant.int8 import DEQUANT_MIN_ROWS, Int8Linear
from glmstack.engine.quant.quantize_model import model_bytes

aten = torch.ops.aten
SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]  # (in_features K, out_features N)


def time_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def candidates(k: int, n: int, m: int) -> list[tuple[str, Callable[[], object], int]]:
    """(name, call, weight bytes) for one K x N weight and M activation rows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=False)
    x32 = torch.randn(m, k)
    x16 = x32.bfloat16()
    w16 = linear.weight.detach().bfloat16()
    int8 = Int8Linear.from_linear(linear, dtype=torch.bfloat16)
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("fp32 F.linear", lambda: F.linear(x32, linear.weight), k * n * 4),
        ("bf16 F.linear", lambda: F.linear(x16, w16), k * n * 2),
        ("int8pack_mm fused (bf16)", lambda: aten._weight_int8pack_mm(x16, int8.weight, int8.weight_scale),
         model_bytes(int8)),
        ("Int8Linear (bf16)", lambda: int8(x16), model_bytes(int8)),
    ]
    if m <= 16:  # the fp32 kernel is a scalar loop: minutes at prompt sizes
        int8_fp32 = Int8Linear.from_linear(linear, dtype=torch.float32)
        rows.append(("int8pack_mm fused (fp32)", lambda: aten._weight_int8pack_mm(
            x32, int8_fp32.weight, int8_fp32.weight_scale), model_bytes(int8_fp32)))
    nk = native.kernels()
    for group in (32, 64, 128):
        if k % group:
            continue
        previous = native.set_enabled(False)  # packed for ATen's kernel, whatever this CPU has
        try:
            int4_aten = Int4Linear.from_linear(linear, group_size=group, dtype=torch.bfloat16)
        finally:
            native.set_enabled(previous)
        rows.append((f"int4pack_mm fused g{group}", lambda m4=int4_aten: aten._weight_int4pack_mm_for_cpu(
            x16, m4.weight, m4.group_size, m4.scales_and_zeros), model_bytes(int4_aten)))
        int4 = Int4Linear.from_linear(linear, group_size=group, dtype=torch.bfloat16)
        rows.append((f"Int4Linear g{group}", lambda m4=int4: m4(x16), model_bytes(int4)))
        if nk is not None and int4.packed_for == "cpu-native":  # the two choices Int4Linear makes by rows
            rows.append((f"native int4 GEMV g{group}", lambda m4=int4: nk.int4_linear(
                x16, m4.weight, m4.scales_and_zeros), model_bytes(int4)))
            rows.append((f"dequantize + GEMM g{group}", lambda m4=int4: F.linear(
                x16, nk.int4_dequantize(m4.weight, m4.scales_and_zeros)), model_bytes(int4)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--m", type=int, default=1, help="activation rows (1 = batch-1 decode GEMV)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, M={args.m} (Int8Linear / Int4Linear "
          f"dequantize from M>={DEQUANT_MIN_ROWS} / {INT4_DEQUANT_MIN_ROWS}), "
          f"CPU {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'K x N':>11}  {'kernel':<26} {'µs':>9} {'GB/s':>7} {'vs fp32':>8}")
    for k, n in SHAPES:
        base = None
        for name, fn, nbytes in candidates(k, n, args.m):
            us = time_us(fn, args.repeats)
            base = base or us
            print(f"{k:>5}x{n:<5}  {name:<26} {us:9.1f} {nbytes / us / 1e3:7.2f} {base / us:7.2f}x")


if __name__ == "__main__":
    main()
