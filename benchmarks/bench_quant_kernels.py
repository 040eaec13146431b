"""Weight-only quantized GEMV/GEMM kernels on this machine: which one moves weight bytes fastest.

    python benchmarks/bench_quant_kernels.py [--threads 2] [--m 1] [--repeats 50]

Batch-1 decode reads every weight once per token, so its speed is weight bytes / time. For each shape
(SmolLM2-135M's 576x1536 MLP both ways, and a 7B-class 4096x4096) this prints µs per call and the
weight bytes moved per second for: fp32 and bf16 `F.linear`, `_weight_int8pack_mm` (bf16 activations),
and the int4 tinygemm kernel with group sizes 32/64/128 (bytes count packed nibbles + bf16 scales/zeros).
With `--m 128` the same table shows prefill-sized GEMMs, where the "dequantize then bf16 GEMM" route is
listed too: the fused kernels dequantize per 4-row tile, the bf16 GEMM uses AMX when present.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from glmstack.engine.quantize import Int4Linear, Int8Linear

SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]  # (in_features K, out_features N)


def time_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--m", type=int, default=1, help="activation rows (1 = decode GEMV)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, M={args.m}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"{'K x N':>11}  {'kernel':<28} {'µs':>9} {'GB/s':>7} {'vs fp32':>8}")
    torch.manual_seed(0)
    for k, n in SHAPES:
        linear = torch.nn.Linear(k, n, bias=False)
        x32 = torch.randn(args.m, k)
        x16 = x32.bfloat16()
        w16 = linear.weight.detach().bfloat16()
        rows: list[tuple[str, Callable[[], object], int]] = [
            ("fp32 F.linear", lambda: F.linear(x32, linear.weight), k * n * 4),
            ("bf16 F.linear", lambda: F.linear(x16, w16), k * n * 2),
        ]
        int8 = Int8Linear.from_linear(linear, dtype=torch.bfloat16)
        rows.append(("int8pack_mm (bf16 act)", lambda m=int8: m(x16), module_bytes(int8)))
        int8_fp32 = Int8Linear.from_linear(linear, dtype=torch.float32)
        rows.append(("int8pack_mm (fp32 act)", lambda m=int8_fp32: m(x32), module_bytes(int8_fp32)))
        if args.m > 1:
            rows.append(("int8 dequant + bf16 GEMM", lambda m=int8: F.linear(x16, m.weight.to(x16.dtype))
                         * m.weight_scale, module_bytes(int8)))
        for group in (32, 64, 128):
            if k % group:
                continue
            int4 = Int4Linear.from_linear(linear, group_size=group, dtype=torch.bfloat16)
            rows.append((f"int4pack_mm g{group} (bf16 act)", lambda m=int4: m(x16), module_bytes(int4)))
        base = None
        for name, fn, nbytes in rows:
            us = time_us(fn, args.repeats)
            base = base or us
            print(f"{k:>5}x{n:<5}  {name:<28} {us:9.1f} {nbytes / us / 1e3:7.2f} {base / us:7.2f}x")


if __name__ == "__main__":
    main()
