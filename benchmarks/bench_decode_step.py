"""Where a batch-1 decode step's time goes: EngineCore.step vs ModelRunner.execute vs the model's forward.

    python benchmarks/bench_decode_step.py [--quantize int8|int4|none] [--dtype auto|float32|bfloat16]
                                           [--threads 2] [--tokens 128]

One greedy request on the bundled model: after its prefill, `--tokens` decode steps are timed. Prints ms per
step for the whole step (scheduler, sampling, detokenizing), the runner (batch building + forward) and the
forward alone, and the resulting tok/s. No peer here: bench_serving.py compares against llama.cpp.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from glmstack import load
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams


def _timed(fn: Callable[..., Any], total: list[float]) -> Callable[..., Any]:
    """`fn`, adding the seconds each call takes to total[0]."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="int8", choices=["int8", "int4", "none"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load(device="cpu", dtype=args.dtype, quantize=None if args.quantize == "none" else args.quantize)
    core = EngineCore(model)
    ids = model.chat_format.render([{"role": "user", "content": "Write a long story about a dragon."}]).token_ids

    runner_seconds, forward_seconds = [0.0], [0.0]
    core.runner.execute = _timed(core.runner.execute, runner_seconds)
    model.module.forward = _timed(model.module.forward, forward_seconds)
    core.add_request("warm-up", ids, SamplingParams(do_sample=False, max_tokens=16))
    while core.has_work():
        core.step()
    # a different first token: nothing of this prompt comes from the prefix cache
    core.add_request("timed", [ids[0] + 1, *ids[1:]], SamplingParams(do_sample=False, max_tokens=args.tokens + 1))
    core.step()  # the prefill
    runner_seconds[0] = forward_seconds[0] = 0.0
    steps, started = 0, time.perf_counter()
    while core.has_work():
        core.step()
        steps += 1
    total = time.perf_counter() - started
    print(f"{args.quantize} {model.dtype} {args.threads} threads: {steps} decode steps, "
          f"{total / steps * 1000:.2f} ms/step (runner {runner_seconds[0] / steps * 1000:.2f} ms, "
          f"forward {forward_seconds[0] / steps * 1000:.2f} ms) -> {steps / total:.1f} tok/s")


if __name__ == "__main__":
    main()
