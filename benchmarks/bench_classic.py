"""`model.chat`'s path: the serving engine (what the classic API runs on) against the plain reference loop.

    python benchmarks/bench_classic.py [--quantize none|int8|int4] [--tokens 64] [--repeats 3]

One process, the bundled model, one greedy reply to the same chat, best of `--repeats` for each path. Prints
both times, the decode rate, whether the texts match, and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from glmstack.engine.classic import load
from glmstack.engine.generation import generate_stream
from glmstack.protocol import SamplingParams


def timed(events) -> tuple[float, str, int]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    text, tokens = "", 0
    for event in events:
        text += event.text
        tokens = event.usage.completion_tokens
    return time.perf_counter() - started, text, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load(device="cpu", quantize=args.quantize)
    ids, _ = model.render_chat([{"role": "user", "content": "Write a short poem about the sea."}], args.tokens)
    params = SamplingParams(max_tokens=args.tokens, do_sample=False)
    stops = set(model.chat_format.stop_token_ids)

    def reference():  # type: ignore[no-untyped-def]
        return generate_stream(model.module, tokenizer, ids, params, context_length=model.context_length,
                               stop_token_ids=stops, device=model.device, dtype=model.dtype)

    # Distinct prompts would defeat nothing here: the prefix cache is off for the timed runs' sake.
    model._local_engine().core.scheduler.enable_prefix_caching = False
    list(model.stream_generate(ids, SamplingParams(max_tokens=4, do_sample=False)))  # warm up both paths
    list(reference())
    results = {}
    for name, run in (("reference loop", reference), ("serving engine", lambda: model.stream_generate(ids, params))):
        seconds, text, tokens = min((timed(run()) for _ in range(args.repeats)), key=lambda r: r[0])
        results[name] = (seconds, text)
        print(f"{name:15} {seconds:6.2f} s  {tokens / seconds:6.1f} tok/s (prompt {len(ids)} tokens)")
    same = results["reference loop"][1] == results["serving engine"][1]
    ratio = results["reference loop"][0] / results["serving engine"][0]
    print(f"{args.quantize}, {torch.get_num_threads()} threads: engine/reference speed {ratio:.2f}x, "
          f"same text: {same}")


if __name__ == "__main__":
    main()
