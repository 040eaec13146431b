"""Peak RSS of the engine serving 16 streams, against issue 4's budget: weights + KV budget + 400 MB.

    python benchmarks/bench_memory.py [--quantize int8|int4|none] [--streams 16] [--max-tokens 64]

One process: load the bundled model, build EngineCore with the default KV budget (512 MiB, as `glmstack serve`
without GLMSTACK_KV_CACHE_MB), run `--streams` greedy requests to the end together, then print the weights'
bytes, the KV pool's bytes, the process's peak RSS (ru_maxrss, so loading counts too) and the budget.
"""

from __future__ import annotations

import argparse
import resource

import torch

from glmstack import load
from glmstack.engine.quant.quantize_model import model_bytes
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="int8", choices=["int8", "int4", "none"])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load(device="cpu", quantize=None if args.quantize == "none" else args.quantize)
    core = EngineCore(model)
    for i in range(args.streams):
        messages = [{"role": "user", "content": f"Story number {i}: write about a dragon."}]
        core.add_request(f"r{i}", model.chat_format.render(messages).token_ids,
                         SamplingParams(do_sample=False, max_tokens=args.max_tokens))
    while core.has_work():
        core.step()
    weights, kv = model_bytes(model.module), core.kv.nbytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    budget = weights + kv + 400 * 10**6
    print(f"{args.quantize}: weights {weights / 1e6:.0f} MB, KV pool {kv / 1e6:.0f} MB, peak RSS {peak / 1e6:.0f} MB, "
          f"budget {budget / 1e6:.0f} MB ({'within' if peak <= budget else 'OVER'})")


if __name__ == "__main__":
    main()
