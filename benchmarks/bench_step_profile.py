"""Where a 16-stream step goes, against what this CPU allows (issue 14's profile).

    python benchmarks/bench_step_profile.py [--quantize int4|int8|auto] [--streams 16] [--tokens 128] [--model M]

One process, the bundled model (or --model: a path or name, e.g. a real-size GGUF with --quantize auto),
`EngineCore` (the server's engine without HTTP), 2 threads:

1. the streams' run end to end (prefill included): seconds, tok/s, and the seconds spent inside each native
   kernel (timed around every call) - the linears, the head (int8), paged attention - and the rest (Python);
2. the VPDPBUSD ceiling: a tiny C++ loop of 12 independent VPDPBUSD chains per thread, compiled here by
   torch.utils.cpp_extension, in multiply-adds per second per thread;
3. paged attention per (row, head, position): 16 prompt rows of one sequence (the tiled path) and 16 rows of
   16 sequences (the row path) at ~2,600 positions.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

import torch

from glmstack.engine import native
from glmstack.engine.classic import load
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams

TOPICS = ["rivers", "mountains", "bread", "clocks", "bridges", "owls", "glass", "trains", "tea", "maps", "salt",
          "kites", "copper", "bees", "lighthouses", "violins", "deserts", "paper", "comets", "gardens"]

PEAK_SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <torch/extension.h>
__attribute__((target("avx512vnni,avx512bw"))) double vpdpbusd_per_second(int64_t iterations) {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);
  auto start = std::chrono::steady_clock::now();
  for (int64_t it = 0; it < iterations; ++it) {
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], w, x);
    asm volatile("" : "+v"(w), "+v"(x));
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  int sink = 0;
  for (int i = 0; i < 12; ++i) sink += _mm512_reduce_add_epi32(acc[i]);
  if (sink == 42) seconds += 1e-12;  // keeps the chains live
  return iterations * 12.0 * 64 / seconds;  // multiply-adds per second
}
"""


def timed_kernels() -> collections.Counter:
    """Wrap the native kernels so every call adds its seconds to the returned counter."""
    nk = native.kernels()
    assert nk is not None, "the native kernels did not build"
    spent: collections.Counter = collections.Counter()
    for name in ("int8_linear", "int8_linear_lanes", "int4_linear", "int4_linear_lanes", "paged_attention"):
        kernel = getattr(nk, name)

        def wrapper(*args, _kernel=kernel, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return _kernel(*args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - started

        setattr(nk, name, wrapper)
    return spent


def streams(args: argparse.Namespace) -> None:
    spent = timed_kernels()  # before loading: the model's native plan keeps the functions it finds
    model, _ = load(args.model, device="cpu", quantize=args.quantize)
    core = EngineCore(model)
    for i in range(args.streams):
        ids = model.chat_format.render([{"role": "user", "content": f"Write a short essay about "
                                         f"{TOPICS[i % len(TOPICS)]}."}]).token_ids
        core.add_request(f"r{i}", ids, SamplingParams(do_sample=False, max_tokens=args.tokens),
                         stop_token_ids=set())
    spent.clear()
    tokens, steps, started = 0, 0, time.perf_counter()
    while core.has_work():
        tokens += sum(len(event.token_ids) for _, event in core.step())
        steps += 1
    total = time.perf_counter() - started
    kernels = sum(spent.values())
    print(f"{args.streams} streams x {args.tokens} tokens, {args.quantize}: {total:.2f} s, {steps} steps, "
          f"{tokens / total:.1f} tok/s")
    for name, seconds in spent.most_common():
        print(f"  {name:16} {seconds:6.2f} s  {1000 * seconds / steps:6.2f} ms/step")
    print(f"  {'other':16} {total - kernels:6.2f} s  {1000 * (total - kernels) / steps:6.2f} ms/step")


def vpdpbusd_ceiling() -> None:
    from torch.utils import cpp_extension

    module = cpp_extension.load_inline("glmstack_bench_vnni_peak", cpp_sources=PEAK_SOURCE,
                                       functions=["vpdpbusd_per_second"], extra_cflags=["-O2"])
    rates = [0.0, 0.0]

    def run(i: int) -> None:
        rates[i] = module.vpdpbusd_per_second(100_000_000)

    print(f"VPDPBUSD, 1 thread: {module.vpdpbusd_per_second(100_000_000) / 1e9:.1f} G multiply-adds/s")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"VPDPBUSD, 2 threads: {rates[0] / 1e9:.1f} + {rates[1] / 1e9:.1f} G multiply-adds/s")


def attention_per_pair() -> None:
    nk = native.kernels()
    assert nk is not None
    heads, kv_heads, dim, rows, past = 9, 3, 64, 16, 2600  # the bundled model's attention shape
    total = past + rows
    dtype = torch.bfloat16
    keys, values = torch.randn(total + 64, kv_heads, dim, dtype=dtype), torch.randn(total + 64, kv_heads, dim,
                                                                                      dtype=dtype)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos, sin = torch.randn(rows, dim, dtype=dtype), torch.randn(rows, dim, dtype=dtype)
    context = torch.arange(total)
    slots, lengths = context[past:].contiguous(), torch.arange(past + 1, total + 1)
    one_context, own_rows = context[None].contiguous(), torch.zeros(rows, dtype=torch.long)
    contexts = context[None].repeat(rows, 1).contiguous()
    calls = {
        "prompt rows (tiled)": lambda: nk.paged_attention(qkv, cos, sin, keys, values, slots, one_context,
                                                          lengths, heads, kv_heads, 0.125, own_rows),
        "one row per sequence": lambda: nk.paged_attention(qkv, cos, sin, keys, values, slots, contexts, lengths,
                                                           heads, kv_heads, 0.125),
    }
    for label, call in calls.items():
        for _ in range(5):
            call()
        started = time.perf_counter()
        for _ in range(30):
            call()
        seconds = (time.perf_counter() - started) / 30
        print(f"paged attention, {label}: {1000 * seconds:.3f} ms per layer, "
              f"{1e9 * seconds / (rows * heads * total):.2f} ns per (row, head, position)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="int4", choices=["int4", "int8", "auto"],
                        help="auto: the checkpoint's own (a GGUF's types) or the default")
    parser.add_argument("--model", default=None, help="a path or name (default: the bundled model)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    streams(args)
    vpdpbusd_ceiling()
    attention_per_pair()


if __name__ == "__main__":
    main()
