"""What the bundled model answers, at the sampling it is served with and on int4's two kernels (issue 14).

    python benchmarks/bench_answers.py [--seeds 10]

One process, the serving engine (`EngineCore`, the server's own path), the README's question:

1. seeds 0..N-1 at the model's own defaults (SmolLM2's card: temperature 0.2, top_p 0.9) and at the
   platform's documented 0.95 / 0.7: how many answers name Paris (issue 14's goal: 9 of 10 at the defaults);
2. int4, greedy, the same request three times, cold then prefix-cached twice: are the answers equal?
3. phrasings of the question (the README's is "... Answer in one sentence.") at int4, int8 and fp32, seeds
   0..N-1 at the model's defaults: how many name Paris.
"""

from __future__ import annotations

import argparse

from glmstack.engine.classic import load
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PHRASINGS = ["What is the capital of France?", "What is the capital of France? Answer in one sentence.",
             "What is the capital of France? Answer in one word.", "Name the capital of France.",
             "What is the capital city of France?"]


def answer(core: EngineCore, request_id: str, ids: list[int], params: SamplingParams) -> str:
    core.add_request(request_id, ids, params)
    text = ""
    while core.has_work():
        for rid, event in core.step():
            if rid == request_id:
                text += event.text
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()

    model, _ = load(device="cpu")
    ids, _ = model.render_chat(QUESTION, 32)
    own = model.generation_defaults
    core = EngineCore(model, enable_prefix_caching=False)
    for label, temperature, top_p in ((f"model defaults ({own.source})", own.temperature, own.top_p),
                                      ("platform defaults", 0.95, 0.7)):
        answers = [answer(core, f"{label}{seed}", ids, SamplingParams(max_tokens=32, temperature=temperature,
                                                                         top_p=top_p, seed=seed))
                   for seed in range(args.seeds)]
        right = sum("Paris" in a for a in answers)
        print(f"fp32, {label}: temperature {temperature}, top_p {top_p}: Paris in {right} of {args.seeds}")

    model, _ = load(device="cpu", quantize="int4")
    ids, _ = model.render_chat(QUESTION, 16)
    core = EngineCore(model)
    greedy = SamplingParams(max_tokens=16, do_sample=False)
    runs = [answer(core, f"int4-{i}", ids, greedy) for i in range(3)]
    print(f"int4 greedy, cold then prefix-cached twice: {runs!r}; identical: {len(set(runs)) == 1}")

    for quantize in ("int4", "int8", None):
        model, _ = load(device="cpu", quantize=quantize)
        core = EngineCore(model, enable_prefix_caching=False)
        own = model.generation_defaults
        for question in PHRASINGS:
            ids, _ = model.render_chat([{"role": "user", "content": question}], 32)
            params = [SamplingParams(max_tokens=24, temperature=own.temperature, top_p=own.top_p, seed=seed)
                      for seed in range(args.seeds)]
            right = sum("Paris" in answer(core, f"{question}{seed}", ids, p) for seed, p in enumerate(params))
            print(f"{quantize or 'fp32'}, model defaults, {question!r}: Paris in {right} of {args.seeds}")


if __name__ == "__main__":
    main()
