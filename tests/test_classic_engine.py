"""The classic API (`model.chat`, `stream_chat`, `stream_generate`) runs on the serving engine, the server's
own path; the plain reference loop stays as its oracle."""

from __future__ import annotations

import pytest

from glmstack.engine.errors import ContextLengthError
from glmstack.engine.generation import generate_stream
from glmstack.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=24, do_sample=False)


def prompt(model, text: str) -> list[int]:
    ids, _ = model.render_chat([{"role": "user", "content": text}], 64)
    return ids


def reference(model, ids: list[int], params: SamplingParams) -> str:
    events = generate_stream(model.module, model.tokenizer, ids, params, context_length=model.context_length,
                             stop_token_ids=set(model.chat_format.stop_token_ids), device=model.device,
                             dtype=model.dtype)
    return "".join(e.text for e in events)


def test_greedy_text_equals_the_reference_loop(bundled) -> None:
    model, _ = bundled
    for text in ("Write a haiku about rain.", "What is 12 times 12?"):
        ids = prompt(model, text)
        assert "".join(e.text for e in model.stream_generate(ids, GREEDY)) == reference(model, ids, GREEDY)
    assert model._local_engine().core.steps > 0  # the engine really ran them


def test_interleaved_generators_each_get_their_own_tokens(bundled) -> None:
    model, _ = bundled
    texts = ("Name three colors.", "Count from one to five.")
    expected = [reference(model, prompt(model, t), GREEDY) for t in texts]
    streams = [model.stream_generate(prompt(model, t), GREEDY) for t in texts]
    got = ["", ""]
    done = [False, False]
    while not all(done):
        for i, stream in enumerate(streams):
            if not done[i]:
                event = next(stream)
                got[i] += event.text
                done[i] = event.finish_reason is not None
    assert got == expected


def test_an_abandoned_generator_frees_its_blocks(bundled) -> None:
    model, _ = bundled
    engine = model._local_engine()
    stream = model.stream_generate(prompt(model, "Tell me a long story."), SamplingParams(max_tokens=500))
    next(stream)
    assert engine.core.allocator.num_in_use > 0 and engine.core.has_work()
    stream.close()  # as a `for` loop broken by Ctrl-C does
    assert not engine.core.has_work() and engine.core.requests == {}


def test_a_prompt_beyond_the_context_is_refused_up_front(bundled) -> None:
    model, _ = bundled
    with pytest.raises(ContextLengthError, match="context window is 8192 tokens"):
        model.stream_generate([1] * model.context_length, GREEDY)
