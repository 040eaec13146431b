"""Do int8 / int4 weights change what the model says? Greedy outputs against bf16, same prompts, one run.

    python benchmarks/bench_quant_agreement.py [--tokens 32]

For each prompt, the share of the first N generated positions where the quantized model picks the same
token as the bf16 model (target: >= 90% on average), plus the longest common prefix. Free-running greedy
text diverges for good at the first near-tie, so the script also reports teacher-forced agreement: fed
bf16's own greedy continuation, how often the quantized model's next-token choice matches bf16's at each
position. And, as the yardstick, the same two figures for fp32 (exact weights) against bf16. Also prints
weight memory before/after quantization.
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does.",
    "List three benefits of exercise.",
    "Translate 'thank you very much' into Spanish.",
    "What is 15 plus 27?",
    "Describe the water cycle in two sentences.",
    "Give me a name for a friendly robot.",
    "Why is the sky blue?",
    "Summarize the plot of Cinderella in one sentence.",
]


def greedy(model, prompt: str, n: int) -> list[int]:
    from glmstack.protocol import SamplingParams

    ids = model.chat_format.render([{"role": "user", "content": prompt}]).token_ids
    events = model.stream_generate(ids, SamplingParams(do_sample=False, max_tokens=n), stop_token_ids=set())
    return [t for e in events for t in e.token_ids]


@torch.inference_mode()
def forced(model, prompt: str, continuation: list[int]) -> list[int]:
    """Next-token argmax at every continuation position, given the reference's own tokens as context."""
    ids = model.chat_format.render([{"role": "user", "content": prompt}]).token_ids
    full = torch.tensor([ids + continuation])
    logits = model.module(full, torch.arange(full.shape[1])[None])
    return logits[0, len(ids) - 1 : len(ids) - 1 + len(continuation)].argmax(-1).tolist()


def weight_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from glmstack import load

    base, _ = load(device="cpu", dtype="bfloat16")
    reference = {p: greedy(base, p, args.tokens) for p in PROMPTS}
    print(f"bf16 weights: {weight_bytes(base.module) / 2**20:.1f} MiB")
    for label in ("fp32", "int8", "int4"):
        if label == "fp32":
            model, _ = load(device="cpu", dtype="float32")
        else:
            model, _ = load(device="cpu", quantize=label)
        shares, prefixes, teacher = [], [], []
        for p in PROMPTS:
            ours, ref = greedy(model, p, args.tokens), reference[p]
            shares.append(sum(a == b for a, b in zip(ours, ref, strict=False)) / args.tokens)
            prefix = 0
            while prefix < min(len(ours), len(ref)) and ours[prefix] == ref[prefix]:
                prefix += 1
            prefixes.append(prefix)
            picks = forced(model, p, ref)
            teacher.append(sum(a == b for a, b in zip(picks, ref, strict=False)) / len(ref))
        mean, forced_mean = sum(shares) / len(shares), sum(teacher) / len(teacher)
        print(f"{label}: weights {weight_bytes(model.module) / 2**20:.1f} MiB · free-running agreement with bf16 "
              f"on the first {args.tokens} tokens: {mean:.1%} (target >= 90%) · teacher-forced: "
              f"{forced_mean:.1%} · per prompt {[round(s * 100) for s in shares]} · common prefix {prefixes}")


if __name__ == "__main__":
    main()
