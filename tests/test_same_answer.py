"""One numerics per precision (issue 14): a greedy request gives the same tokens cold, after a prefix-cache hit,
and inside a batch of 16 requests whose prompts are chunked across steps, on the bundled model served int8 and
int4 through the serving engine (`EngineCore`, the server's own path).

What makes it hold, and what each part of the test would catch: the native int8/int4 kernels compute a row
the same way whatever else their call holds (a cached prompt's tail ran through another kernel than the cold
prompt before), a Llama step runs the same fused layers for prompt and decode rows (native/fused_decoder.py),
and prompt attention runs per block of positions that chunking never splits (kv_cache.PagedPrefill).
"""

from __future__ import annotations

import pytest

from glmstack import load
from glmstack.engine import native
from glmstack.engine.serving.core import EngineCore
from glmstack.protocol import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 12 times 7?", "Name a color.",
             "Translate 'hello' to French.", "What do bees make?", "Describe a cat.", "Say something kind.",
             "What is the boiling point of water?", "Tell me a joke.", "What is Python?", "Name a planet.",
             "Why is the sky blue?"]
GREEDY = SamplingParams(max_tokens=24, do_sample=False)


def run(core: EngineCore, requests: dict[str, list[int]]) -> dict[str, list[int]]:
    """Token ids each request generated, all submitted before the first step."""
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    for rid, ids in requests.items():
        core.add_request(rid, ids, GREEDY)
    while core.has_work():
        for rid, event in core.step():
            out[rid].extend(event.token_ids)
    return out


def _finish(core: EngineCore, rid: str) -> list[int]:
    tokens: list[int] = []
    while core.has_work():
        for r, event in core.step():
            if r == rid:
                tokens.extend(event.token_ids)
    return tokens


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_greedy_tokens_are_the_same_cold_cached_and_in_a_batch(quantize) -> None:
    if not native.vnni_rows():
        pytest.skip("one numerics per precision needs the native kernels' VNNI path (AVX512-VNNI)")
    model, _ = load(device="cpu", quantize=quantize)
    prompts = [model.render_chat([{"role": "user", "content": q}], GREEDY.max_tokens)[0] for q in QUESTIONS]
    alone = [run(EngineCore(model, enable_prefix_caching=False), {"alone": ids})["alone"] for ids in prompts]
    assert len({tuple(t) for t in alone}) > 8  # 16 real answers, not one degenerate string

    core = EngineCore(model)
    first = run(core, {"cold": prompts[0]})["cold"]
    core.add_request("cached", prompts[0], GREEDY)
    seq = core.scheduler.waiting[-1]
    again = _finish(core, "cached")
    assert seq.prefix_hit_tokens >= 32  # the prompt's full blocks came from the cache; its tail was computed
    assert first == alone[0] and again == alone[0]

    # 16 prompts of ~36 tokens in a 512-token step budget: the first step prefills 14 of them (the last one
    # cut at a block boundary), the next mixes the first decodes with the remaining prompt chunks
    batched = run(EngineCore(model, step_target_seconds=None),
                  {f"r{i}": prompts[i] for i in range(len(prompts))})
    assert sum(len(ids) for ids in prompts) > 512
    assert [batched[f"r{i}"] for i in range(len(prompts))] == alone
