"""The native int8 GEMV on weights streamed from memory (not cache-hot), against a plain read of memory.

    python benchmarks/bench_native_stream.py [--threads 2] [--megabytes 200]

For each decode shape of the bundled model, enough distinct int8 matrices to fill `--megabytes` are
multiplied by one activation row in turn, so every call reads its weights from DRAM as in a real decode step;
best of three passes, in GB/s of weights. The peer is `torch.sum` over a 256 MB fp32 tensor on the same
threads: about what this machine's memory delivers to a simple reader.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from glmstack.engine import native

SHAPES = [(3072, 576), (576, 1536), (576, 576), (49152, 576)]  # gate_up, down, q/o, head: [N, K]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    print(f"plain fp32 read (torch.sum, 256 MB): {5 * plain.numel() * 4 / (time.perf_counter() - started) / 1e9:.1f} GB/s")
    for n, k in SHAPES:
        mats = [torch.randint(-127, 127, (n, k), dtype=torch.int8)
                for _ in range(max(2, args.megabytes * 10**6 // (n * k)))]
        scale, x = torch.rand(n), torch.randn(1, k)
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            for w in mats:
                kernels.int8_linear(x, w, scale, None, None, 0.0, False, None)
            best = max(best, len(mats) * n * k / (time.perf_counter() - started) / 1e9)
        print(f"int8 GEMV {n}x{k}, {len(mats)} matrices: {best:.1f} GB/s")


if __name__ == "__main__":
    main()
