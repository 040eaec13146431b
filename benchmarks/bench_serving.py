"""The serving engine vs llama.cpp (llama-cpp-python) and transformers, same GGUF, same threads, one run.

    python benchmarks/bench_serving.py [--quantize int8|int4|none] [--threads 2] [--skip-transformers]

Needs the bench extra (`bash scripts/setup.sh bench`; llama-cpp-python compiles for ~9 minutes).
Prints, for the bundled SmolLM2-135M-Instruct Q4_1 GGUF:
  1. decode tok/s at batch 1                      (target >= 1.0x llama.cpp), through EngineCore and through
     the classic API's path (`model.stream_generate`, what model.chat / stream_chat / glmstack chat run on)
  2. prefill tok/s on a 500-token prompt          (target >= 2x llama.cpp)
  3. aggregate decode tok/s, 16 concurrent streams (target >= 3x llama.cpp serving them one at a time,
     which is what llama-cpp-python's server does)
  4. time to first token of turn 10 / turn 1 in a 10-turn chat (target <= 1.5x), medians of 3 chats
  5. decode batch 1 vs transformers generate (target >= 5x), ours measured again around transformers' run
Decode rate is (N-1) / (time for N tokens - time for 1 token) for every engine, so prefill cancels out.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

STORY = ("Once upon a time, in a kingdom by the sea, there lived an old clockmaker who repaired every clock in "
         "the town. Each morning he opened his shop, wound the great tower clock, and listened to the bells. ")
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "What is 7 times 8?", "Give me a synonym for happy.", "Who wrote Hamlet?",
             "Describe a cat in one sentence.", "What is the boiling point of water?",
             "Translate 'good morning' to French.", "List two planets.", "What is photosynthesis?",
             "Say something kind.", "How many legs does a spider have?", "What is the largest ocean?",
             "Name a famous painter.", "What language is spoken in Brazil?"]


def median(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- glmstack ------------------------------------------------------------------------------------------


class Ours:
    def __init__(self, quantize: str | None, dtype: str) -> None:
        from glmstack import load
        from glmstack.engine.serving.core import EngineCore

        self.model, self.tokenizer = load(device="cpu", dtype=dtype, quantize=quantize)
        self.core = EngineCore(self.model)
        self.n = 0

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.model.chat_format.render(messages).token_ids

    def run(self, prompts: list[list[int]], max_tokens: int, stop: bool = False) -> dict:
        from glmstack.protocol import SamplingParams

        ids = []
        for p in prompts:
            self.n += 1
            rid = f"r{self.n}"
            ids.append(rid)
            self.core.add_request(rid, p, SamplingParams(do_sample=False, max_tokens=max_tokens),
                                  stop_token_ids=None if stop else set())
        start = time.perf_counter()
        first: dict[str, float] = {}
        tokens: dict[str, list[int]] = {r: [] for r in ids}
        while self.core.has_work():
            for rid, event in self.core.step():
                first.setdefault(rid, time.perf_counter() - start)
                tokens[rid].extend(event.token_ids)
        return {"elapsed": time.perf_counter() - start, "ttft": first, "tokens": tokens}

    def prefill(self, prompt: list[int]) -> float:
        return self.run([prompt], 1)["elapsed"]


# ---- llama.cpp -----------------------------------------------------------------------------------------


class LlamaCpp:
    def __init__(self, path: str, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=4096,
                         n_batch=512, verbose=False)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def generate(self, prompt: list[int], n: int, keep_prefix: bool = False) -> float:
        """Greedy n tokens; returns time to first token. keep_prefix reuses the KV of a common prefix,
        as llama-cpp-python's own generate() does between calls."""
        llm = self.llm
        start = time.perf_counter()
        if keep_prefix:
            common = 0
            for a, b in zip(llm._input_ids.tolist(), prompt, strict=False):
                if a != b:
                    break
                common += 1
            common = min(common, len(prompt) - 1)
            llm.n_tokens = common
            llm._ctx.kv_cache_seq_rm(-1, common, -1)
            llm.eval(prompt[common:])
        else:
            llm.reset()
            llm._ctx.kv_cache_clear()
            llm.eval(prompt)
        ttft = None
        for _ in range(n):
            token = int(np.argmax(self._last_logits()))
            if ttft is None:
                ttft = time.perf_counter() - start
            llm.eval([token])
        return ttft or 0.0


# ---- transformers --------------------------------------------------------------------------------------


class Transformers:
    def __init__(self, path: str) -> None:
        import os

        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompt: list[int], n: int) -> None:
        ids = torch.tensor([prompt])
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)


def decode_rate(gen, prompt: list[int], n: int) -> float:
    gen(prompt, 1)
    one = median(lambda: gen(prompt, 1))
    many = median(lambda: gen(prompt, n))
    return (n - 1) / (many - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", default="int4", choices=["int8", "int4", "none"],
                        help="int4 is what the server runs the bundled Q4_1 GGUF as by default")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from glmstack.engine.loading.catalog import bundled_model_path

    path = str(bundled_model_path())
    ours = Ours(None if args.quantize == "none" else args.quantize, args.dtype)
    short = ours.chat_ids([{"role": "user", "content": "Tell me a story about a clockmaker."}])
    long_prompt = ours.tokenizer.encode(STORY * 20)[:500]
    prompts = [ours.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    n = args.new_tokens

    def conversation(reply_fn, repeats: int = 3) -> list[float]:
        """Ten turns; the median TTFT of each turn over `repeats` conversations (one TTFT of ~100 ms moves by
        tens of ms on this machine). Each conversation opens with its own system prompt, so none reuses
        another's blocks. Replies are each engine's own greedy output (llama.cpp: a fixed one)."""
        runs = []
        for repeat in range(repeats):
            system = f"Conversation {repeat}. " + "You are a helpful assistant. " * 4
            messages: list[dict] = [{"role": "system", "content": system}]
            ttfts = []
            for turn in range(10):
                messages.append({"role": "user", "content": QUESTIONS[turn] + " " + STORY})
                ttft, reply = reply_fn(messages)
                ttfts.append(ttft)
                messages.append({"role": "assistant", "content": reply})
            runs.append(ttfts)
        return [statistics.median(turn) for turn in zip(*runs, strict=True)]

    def ours_reply(messages):
        r = ours.run([ours.chat_ids(messages)], 24, stop=True)
        rid = next(iter(r["tokens"]))
        return r["ttft"][rid], ours.tokenizer.decode(r["tokens"][rid], skip_special_tokens=True)

    def classic(prompt: list[int], k: int) -> None:
        """`model.stream_generate`, what `model.chat` / `stream_chat` / `glmstack chat` run on."""
        from glmstack.protocol import SamplingParams

        for _ in ours.model.stream_generate(prompt, SamplingParams(do_sample=False, max_tokens=k), set()):
            pass

    # glmstack first, then llama.cpp (its idle worker threads would otherwise share our two cores)
    ours_decode = decode_rate(lambda p, k: ours.run([p], k), short, n)
    classic_decode = decode_rate(classic, short, n)
    ours.prefill(long_prompt[:16])
    # a different first token every run: no block of the prompt can come from the prefix cache
    ours_prefill = 500 / median(lambda: ours.prefill([1000 + ours.n % 1000] + long_prompt[1:]))
    result = ours.run(prompts, n)
    ours_agg = sum(len(t) for t in result["tokens"].values()) / result["elapsed"]
    ours_turns = conversation(ours_reply)

    cpp = LlamaCpp(path, args.threads)
    cpp_decode = decode_rate(lambda p, k: cpp.generate(p, k), short, n)
    cpp_prefill = 500 / median(lambda: cpp.generate(long_prompt, 1))
    start = time.perf_counter()
    for p in prompts:  # what llama-cpp-python's server does with 16 requests: one at a time
        cpp.generate(p, n)
    cpp_agg = len(prompts) * n / (time.perf_counter() - start)

    def cpp_reply(messages):
        return cpp.generate(ours.chat_ids(messages), 24, keep_prefix=True), "I see."

    cpp_turns = conversation(cpp_reply)
    rows = [
        ("decode tok/s, batch 1", ours_decode, cpp_decode, ">= 1.0x"),
        ("decode tok/s, batch 1, classic model.chat", classic_decode, cpp_decode, ">= 1.0x"),
        ("prefill tok/s, 500-token prompt", ours_prefill, cpp_prefill, ">= 2x"),
        ("aggregate decode tok/s, 16 streams", ours_agg, cpp_agg, ">= 3x"),
        ("TTFT turn 10 / turn 1 (lower is better)", ours_turns[-1] / ours_turns[0], cpp_turns[-1] / cpp_turns[0],
         "<= 1.5x (ours)"),
    ]

    print(f"machine: {platform.machine()} · torch {torch.__version__} · {args.threads} threads · glmstack "
          f"{args.quantize} {ours.model.dtype} · llama.cpp on the same Q4_1 GGUF")
    print(f"{'metric':<42}{'glmstack':>11}{'llama.cpp':>11}{'ratio':>8}  target")
    for label, a, b, target in rows:
        ratio = a / b if "lower" not in label else a
        shown = f"{ratio:>7.2f}x" if "lower" not in label else f"{a:>7.2f} "
        print(f"{label:<42}{a:>11.2f}{b:>11.2f}{shown}  {target}")
    print(f"  ours TTFT per turn (ms): {[round(t * 1000) for t in ours_turns]}")
    print(f"  llama.cpp TTFT per turn (ms): {[round(t * 1000) for t in cpp_turns]}")

    if not args.skip_transformers:
        hf = Transformers(path)
        hf_n = min(args.new_tokens, 32)
        # This machine's speed drifts by tens of percent over minutes: ours is measured again right before
        # and right after transformers, on the same number of tokens, and the ratio uses their mean.
        before = decode_rate(lambda p, k: ours.run([p], k), short, hf_n)
        hf_decode = decode_rate(hf.generate, short, hf_n)
        after = decode_rate(lambda p, k: ours.run([p], k), short, hf_n)
        ours_near = (before + after) / 2
        print(f"{'decode tok/s vs transformers generate':<42}{ours_near:>11.2f}{hf_decode:>11.2f}"
              f"{ours_near / hf_decode:>7.2f}x  >= 5x")
        print(f"  ours right before / after transformers: {before:.1f} / {after:.1f} tok/s")
        hf_turns = []
        messages: list[dict] = [{"role": "system", "content": "You are a helpful assistant. " * 4}]
        for turn in range(10):
            messages.append({"role": "user", "content": QUESTIONS[turn] + " " + STORY})
            prompt = ours.chat_ids(messages)
            hf_turns.append(median(lambda p=prompt: hf.generate(p, 1), 1))
            messages.append({"role": "assistant", "content": "I see."})
        print(f"  transformers TTFT turn 10 / turn 1: {hf_turns[-1] / hf_turns[0]:.2f}x "
              f"({round(hf_turns[0] * 1000)} -> {round(hf_turns[-1] * 1000)} ms)")


if __name__ == "__main__":
    main()
