"""The batched, paged engine against the plain reference loop, on the bundled model (greedy, fp32)."""

from __future__ import annotations

import pytest

from glmstack import load
from glmstack.engine.serving.core import EngineCore, RequestTooLargeError
from glmstack.protocol import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "你好，请介绍一下你自己。",
    "What is 12 times 12?",
]


def prompt_ids(model, text: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return model.chat_format.render(messages).token_ids


def reference(model, ids: list[int], max_tokens: int) -> tuple[str, list[int], str]:
    events = list(model.stream_generate(ids, SamplingParams(do_sample=False, max_tokens=max_tokens)))
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events[-1].finish_reason


def run_all(core: EngineCore) -> dict[str, tuple[str, list[int], str]]:
    text: dict[str, str] = {}
    tokens: dict[str, list[int]] = {}
    done: dict[str, tuple[str, list[int], str]] = {}
    for _ in range(10_000):
        if not core.has_work():
            break
        for rid, event in core.step():
            text[rid] = text.get(rid, "") + event.text
            tokens.setdefault(rid, []).extend(event.token_ids)
            if event.finish_reason:
                done[rid] = (text[rid], tokens[rid], event.finish_reason)
    return done


def test_batched_equals_one_at_a_time(bundled) -> None:
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=64 << 20, max_batch_tokens=48)  # small budget: chunked prefill
    for i, text in enumerate(PROMPTS):
        core.add_request(f"r{i}", prompt_ids(model, text), SamplingParams(do_sample=False, max_tokens=24))
    done = run_all(core)
    for i, text in enumerate(PROMPTS):
        assert done[f"r{i}"] == reference(model, prompt_ids(model, text), 24), text
    assert core.allocator.num_in_use == 0  # every block back in the pool (cached ones are evictable)


def test_prompt_longer_than_a_step_alone(bundled) -> None:
    """Its first steps sample nothing: each is one chunk of the prompt that does not reach its end."""
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=64 << 20, max_batch_tokens=8)
    ids = prompt_ids(model, PROMPTS[1])
    core.add_request("alone", ids, SamplingParams(do_sample=False, max_tokens=8))
    assert run_all(core)["alone"] == reference(model, ids, 8)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_prompt_longer_than_a_step_alone(quantize: str) -> None:
    """The same on quantized weights, whose head is a native GEMV with the final norm fused in: a step that
    samples no row hands it zero rows (this failed every such step: a server refused all long prompts)."""
    model, _ = load(quantize=quantize)
    core = EngineCore(model, kv_cache_bytes=64 << 20, max_batch_tokens=8)
    ids = prompt_ids(model, PROMPTS[1])
    core.add_request("alone", ids, SamplingParams(do_sample=False, max_tokens=8))
    text, tokens, finish = run_all(core)["alone"]  # a failed step raises here
    assert finish == "length" and len(tokens) == 8 and text
    assert core.allocator.num_in_use == 0


def test_prefix_cache_hit_gives_identical_tokens(bundled) -> None:
    model, _ = bundled
    system = "You are a careful assistant. " * 12  # several full blocks shared by both requests
    core = EngineCore(model, kv_cache_bytes=64 << 20)
    ids = prompt_ids(model, PROMPTS[0], system)
    core.add_request("cold", ids, SamplingParams(do_sample=False, max_tokens=16))
    cold = run_all(core)["cold"]
    hits_before = core.allocator.hits
    core.add_request("warm", ids, SamplingParams(do_sample=False, max_tokens=16))
    warm = run_all(core)["warm"]
    assert core.allocator.hits - hits_before >= (len(ids) // 16 - 1) * 16
    assert warm == cold == reference(model, ids, 16)


def test_abort_mid_stream_frees_every_block(bundled) -> None:
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=64 << 20, enable_prefix_caching=False)
    core.add_request("a", prompt_ids(model, PROMPTS[1]), SamplingParams(do_sample=False, max_tokens=200))
    core.add_request("b", prompt_ids(model, PROMPTS[2]), SamplingParams(do_sample=False, max_tokens=200))
    for _ in range(5):
        core.step()
    assert core.allocator.num_in_use > 0
    core.abort("a")
    core.abort("b")
    assert core.allocator.num_free == core.allocator.num_blocks
    assert not core.has_work()


def test_request_larger_than_kv_budget_is_refused(bundled) -> None:
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=1 << 20)  # ~45 tokens of KV for this model
    with pytest.raises(RequestTooLargeError, match="KV cache"):
        core.add_request("big", prompt_ids(model, PROMPTS[3]), SamplingParams(do_sample=False, max_tokens=500))
    assert not core.has_work()


def test_kv_pressure_preempts_and_still_matches(bundled) -> None:
    """A pool too small for all sequences at once: preemption + recompute must not change greedy output."""
    model, _ = bundled
    ids = [prompt_ids(model, t) for t in PROMPTS[:4]]
    need = max(len(i) for i in ids) + 24
    # by tokens alone: the four prompts must run together for the pool to overflow, whatever the timing
    core = EngineCore(model, kv_cache_bytes=core_bytes(model, 2 * need), max_batch_tokens=64,
                      step_target_seconds=None)
    for n, i in enumerate(ids):
        core.add_request(f"p{n}", i, SamplingParams(do_sample=False, max_tokens=24))
    done = run_all(core)
    assert core.scheduler.preemptions > 0  # the pool really was too small
    for n, i in enumerate(ids):
        assert done[f"p{n}"] == reference(model, i, 24)


def core_bytes(model, tokens: int) -> int:
    cfg = model.module.config
    element = model.module.model.embed_tokens.weight.element_size()
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element
    return per_token * (tokens + 32)


def test_abandoned_step_stops_within_a_layer_and_leaves_no_trace(bundled) -> None:
    """A client that hangs up during a long prefill chunk: the pass stops at the next layer, nothing of it
    is recorded or cached, and the same prompt afterwards decodes exactly like a cold run."""
    model, _ = bundled
    # Plans by tokens alone, so that both prompts below fit one step whatever the machine's timing
    core = EngineCore(model, kv_cache_bytes=64 << 20, step_target_seconds=None)
    ids = prompt_ids(model, PROMPTS[3], system="You are a careful assistant. " * 8)
    polls: list[str] = []

    def abandoned_after_two_layers(request_id: str) -> bool:
        polls.append(request_id)
        return len(polls) > 2

    core.add_request("gone", ids, SamplingParams(do_sample=False, max_tokens=8))
    assert core.step(abandoned_after_two_layers) == []
    assert len(polls) == 3 < model.module.config.num_layers  # stopped at the third layer
    core.abort("gone")
    assert core.allocator.num_in_use == 0 and not core.has_work()
    hits = core.allocator.hits
    core.add_request("again", ids, SamplingParams(do_sample=False, max_tokens=8))
    assert run_all(core)["again"] == reference(model, ids, 8)
    assert core.allocator.hits == hits  # no block of the abandoned pass was served from the prefix cache

    # One live request in the step keeps the pass going for everyone.
    core.add_request("live", prompt_ids(model, PROMPTS[0]), SamplingParams(do_sample=False, max_tokens=4))
    # (a system prompt of its own: a prompt sharing live's first block would wait a step for live's blocks)
    core.add_request("dead", prompt_ids(model, PROMPTS[2], system="You are terse."),
                     SamplingParams(do_sample=False, max_tokens=4))
    events = core.step(lambda request_id: request_id == "dead")
    assert {request_id for request_id, _ in events} == {"live", "dead"}


def test_a_batch_step_gives_way_to_an_interactive_request_and_loses_nothing(bundled) -> None:
    """A step of background rows stops within a layer once an interactive request is waiting, records nothing,
    and the batch rows still end with exactly the tokens they get alone."""
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=64 << 20, step_target_seconds=None)
    params = SamplingParams(do_sample=False, max_tokens=6)
    ids = {name: prompt_ids(model, PROMPTS[i]) for i, name in enumerate(("b0", "b1"))}
    for name, prompt in ids.items():
        core.add_request(name, prompt, params, background=True)
    polls: list[int] = []

    def interactive_after_two_layers() -> bool:
        polls.append(1)
        return len(polls) > 2

    assert core.step(None, interactive_after_two_layers) == []  # stopped for the newcomer
    assert len(polls) == 3 < model.module.config.num_layers
    chat = prompt_ids(model, PROMPTS[2], system="You are terse.")  # (its own first block: not deferred)
    core.add_request("chat", chat, params)
    first = core.step(None, lambda: True)  # a step with an interactive row never gives way
    assert [request_id for request_id, _ in first] == ["chat"]  # the chat's prompt alone
    results = run_all(core)
    for name, prompt in ids.items():
        assert results[name] == reference(model, prompt, 6)
    assert first[0][1].token_ids + results["chat"][1] == reference(model, chat, 6)[1]


def test_a_long_prompt_step_gives_way_to_a_newcomer_and_loses_nothing(bundled) -> None:
    """A step carrying a chunk from the middle of a long prompt stops within a layer once an interactive
    request arrives; the next step is the newcomer's (the decoding stream's token with it, the long prompt
    sitting out), and that step does not give way in turn. Everyone ends with the tokens they get alone."""
    model, _ = bundled
    core = EngineCore(model, kv_cache_bytes=64 << 20, max_batch_tokens=256)  # the default StepBudget
    params = SamplingParams(do_sample=False, max_tokens=6)
    stream = prompt_ids(model, PROMPTS[0])
    core.add_request("stream", stream, params)
    tokens: dict[str, list[int]] = {"stream": [], "long": [], "chat": []}

    def record(events) -> list[str]:  # type: ignore[no-untyped-def]
        for rid, event in events:
            tokens[rid] += event.token_ids
        return sorted(rid for rid, _ in events)

    assert record(core.step()) == ["stream"]  # it decodes from now on
    long = prompt_ids(model, " ".join(PROMPTS[1:4] * 30), system="You are thorough.")
    assert len(long) > 2 * 256
    core.add_request("long", long, SamplingParams(do_sample=False, max_tokens=2))
    polls: list[int] = []

    def newcomer_after_two_layers() -> bool:
        polls.append(1)
        return len(polls) > 2

    assert core.step(None, newcomer_after_two_layers) == []  # stream + a chunk of long: stopped
    assert len(polls) == 3 < model.module.config.num_layers
    chat = prompt_ids(model, PROMPTS[5], system="You are terse.")
    core.add_request("chat", chat, params)
    # the newcomer's step, which nothing can interrupt (no chunk in it is the middle of a long prompt)
    assert record(core.step(None, lambda: True)) == ["chat", "stream"]
    assert core.requests["long"].seq.num_computed == 0  # it sat this step out
    for name, (_, rest, _) in run_all(core).items():
        tokens[name] += rest
    for name, prompt, count in (("stream", stream, 6), ("long", long, 2), ("chat", chat, 6)):
        assert tokens[name] == reference(model, prompt, count)[1], name
