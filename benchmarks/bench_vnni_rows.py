"""The native int8 / int4 kernels on their VNNI path at decode and prompt row counts (issue 14).

    python benchmarks/bench_vnni_rows.py

For SmolLM2-135M's MLP shapes and its output head: whether row i of a 517-row call equals the same row alone
(bit for bit: one numerics for decode and prompts), the int8 kernel's error against fp32 activations, and ms
per call (best of 10, 2 threads) of int4 / int8 on VNNI against dequantize + bf16 GEMM, the prompt path they
replaced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_quant_kernels import time_us  # the best of n runs (this folder is on sys.path)

from glmstack.engine import native
from glmstack.engine.quant.int4 import pack_int4_native, quantize_int4
from glmstack.engine.quant.int8 import quantize_int8


def best_ms(fn: Callable[[], object], repeats: int = 10) -> float:
    return time_us(fn, repeats) / 1e3


def time_rows(nk, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, q8: torch.Tensor,
              s8: torch.Tensor) -> tuple[float, float, float]:
    return (best_ms(lambda: nk.int4_linear(x, packed, sz, None)), best_ms(lambda: nk.int8_linear(x, q8, s8, None)),
            best_ms(lambda: F.linear(x.bfloat16(), nk.int4_dequantize(packed, sz))))


def main() -> None:
    nk = native.kernels()
    if nk is None or nk.activation_path() != "vnni":
        raise SystemExit("needs the native kernels on their VNNI path (AVX512-VNNI)")
    torch.manual_seed(0)
    for k, n in [(576, 1536), (1536, 576), (576, 49152)]:
        w = torch.randn(n, k) * 0.02
        packed, sz = pack_int4_native(quantize_int4(w, 32, torch.bfloat16), torch.bfloat16)
        q8, s8 = quantize_int8(w, torch.bfloat16)
        x_all = torch.randn(517, k)
        whole4, whole8 = nk.int4_linear(x_all, packed, sz, None), nk.int8_linear(x_all, q8, s8, None)
        same4 = all(torch.equal(nk.int4_linear(x_all[i : i + 1], packed, sz, None)[0], whole4[i])
                    for i in range(0, 517, 37))
        same8 = all(torch.equal(nk.int8_linear(x_all[i : i + 1], q8, s8, None)[0], whole8[i])
                    for i in range(0, 517, 37))
        exact8 = F.linear(x_all, q8.float() * s8.float()[:, None])
        err8 = ((whole8 - exact8).norm() / exact8.norm()).item()
        print(f"{k}x{n}: a row alone == the same row among 517: int4 {same4}, int8 {same8}; "
              f"int8 error from int8 activations {err8:.2e}")
        for m in (1, 16, 64, 512):
            t4, t8, deq = time_rows(nk, x_all[:m].contiguous(), packed, sz, q8, s8)
            print(f"  {m:4d} rows: int4 {t4:7.3f} ms  int8 {t8:7.3f} ms  dequantize + bf16 GEMM {deq:7.3f} ms")


if __name__ == "__main__":
    main()
