"""The native int8 / int4 GEMV on weights streamed from memory (not cache-hot), against a plain read of memory.

    python benchmarks/bench_native_stream.py [--bits 8|4] [--group 32] [--threads 2] [--megabytes 200]

For each decode shape of the bundled model, enough distinct matrices to fill `--megabytes` are multiplied by
one activation row in turn, so every call reads its weights from DRAM as in a real decode step; best of
three passes, in GB/s of weight bytes read (int4: the packed nibbles plus the bf16 scales and zeros). With
`--bits 4` each int4 kernel this CPU has is timed: `fp32` (nibbles converted to fp32, FMAs) and, where the
CPU has AVX512-VNNI, `vnni` (activations quantized to int8 once per call, u8 x s8 dot products), taking
turns pass by pass so that a busy moment on a shared machine hits both; shapes whose K the group doesn't
divide are skipped. The peer
is `torch.sum` over a 256 MB fp32 tensor on the same threads: about what this machine's memory delivers to
a simple reader.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial
from types import ModuleType

import torch

from glmstack.engine import native

SHAPES = [(3072, 576), (576, 1536), (576, 576), (49152, 576)]  # gate_up, down, q/o, head: [N, K]


def best_gbps(calls: list[Callable[[], object]], nbytes: int, passes: int = 3) -> float:
    """Best of `passes` passes over `calls` (each reading `nbytes` of weights), in GB/s."""
    best = 0.0
    for _ in range(passes):
        started = time.perf_counter()
        for call in calls:
            call()
        best = max(best, len(calls) * nbytes / (time.perf_counter() - started) / 1e9)
    return best


def bench_int8(kernels: ModuleType, megabytes: int) -> None:
    for n, k in SHAPES:
        mats = [torch.randint(-127, 127, (n, k), dtype=torch.int8) for _ in range(max(2, megabytes * 10**6 // (n * k)))]
        scale, x = torch.rand(n), torch.randn(1, k)
        calls = [partial(kernels.int8_linear, x, w, scale, None, None, 0.0, False, None) for w in mats]
        print(f"int8 GEMV {n}x{k}, {len(mats)} matrices: {best_gbps(calls, n * k):.1f} GB/s")


def bench_int4(kernels: ModuleType, megabytes: int, group: int) -> None:
    paths = ["fp32"]
    if hasattr(kernels, "vnni_supported") and kernels.vnni_supported():
        paths.append("vnni")
    for n, k in SHAPES:
        if k % group:
            print(f"int4 GEMV {n}x{k}: skipped, {k} inputs are not a multiple of group {group}")
            continue
        nbytes = n * k // 2 + n * 2 * (k // group) * 2  # nibbles + bf16 scales and zeros
        mats = [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                 (torch.rand(n, 2, k // group) * 0.02).to(torch.bfloat16))
                for _ in range(max(2, megabytes * 10**6 // nbytes))]
        x = torch.randn(1, k, dtype=torch.bfloat16)
        calls = [partial(kernels.int4_linear, x, w, sz, None, None, 0.0, False, None) for w, sz in mats]
        best = dict.fromkeys(paths, 0.0)
        for _ in range(3):  # the paths take turns, so a busy moment on a shared machine hits both
            for path in paths:
                previous = kernels.set_vnni(path == "vnni") if hasattr(kernels, "set_vnni") else None
                try:
                    best[path] = max(best[path], best_gbps(calls, nbytes, passes=1))
                finally:
                    if previous is not None:
                        kernels.set_vnni(previous)
        figures = [f"{path} {gbps:.1f} GB/s" for path, gbps in best.items()]
        print(f"int4 GEMV {n}x{k} group {group}, {len(mats)} matrices: {', '.join(figures)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=8, choices=[8, 4])
    parser.add_argument("--group", type=int, default=32, help="int4 group size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = native.kernels()
    if kernels is None:
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    plain = torch.ones(1 << 26, dtype=torch.float32)
    plain.sum()
    started = time.perf_counter()
    for _ in range(5):
        plain.sum()
    rate = 5 * plain.numel() * 4 / (time.perf_counter() - started) / 1e9
    print(f"plain fp32 read (torch.sum, 256 MB): {rate:.1f} GB/s")
    if args.bits == 8:
        bench_int8(kernels, args.megabytes)
    else:
        bench_int4(kernels, args.megabytes, args.group)


if __name__ == "__main__":
    main()
