"""Tool calls and reasoning flowing out of the engine: a chat format's tool grammar forces a call on the bundled
model, its reply parser turns the text into `tool_calls` events, and the reply ends with "tool_calls"."""

from __future__ import annotations

import asyncio
import copy
import json

import jsonschema
import pytest

from glmstack.engine.chat_format.base import ChatFormat, ChatPrompt, ReplyDelta, ReplyParser
from glmstack.engine.serving.async_engine import AsyncEngine
from glmstack.protocol import GenerateRequest, GenerationEvent, SamplingParams, ToolCallDelta

pytestmark = pytest.mark.slow

OPEN, CLOSE = "<tool_call>", "</tool_call>"

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


class TagCallParser(ReplyParser):
    """Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; with `thinking`, the text before
    "</think>" is reasoning."""

    def __init__(self, thinking: bool) -> None:
        self.buffer = ""
        self.thinking = thinking
        self.calls = 0

    def push(self, text: str) -> ReplyDelta:
        self.buffer += text
        delta = ReplyDelta()
        if self.thinking:
            head, sep, rest = self.buffer.partition("</think>")
            if not sep:
                delta.reasoning, self.buffer = self.buffer, ""
                return delta
            delta.reasoning, self.buffer, self.thinking = head, rest, False
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = next((n for n in range(len(OPEN) - 1, 0, -1) if self.buffer.endswith(OPEN[:n])), 0)
                cut = len(self.buffer) - keep
                delta.content += self.buffer[:cut]
                self.buffer = self.buffer[cut:]
                return delta
            delta.content += self.buffer[:start]
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                return delta
            call = json.loads(self.buffer[start + len(OPEN):end])
            delta.tool_calls.append(ToolCallDelta(self.calls, f"call_{self.calls}", call["name"],
                                                  json.dumps(call["arguments"])))
            self.calls += 1
            self.buffer = self.buffer[end + len(CLOSE):]

    def finish(self) -> ReplyDelta:
        out, self.buffer = self.buffer, ""
        return ReplyDelta(reasoning=out) if self.thinking else ReplyDelta(content=out)


class TagCallFormat(ChatFormat):
    """The model's own format for the prompt; tool calls as TagCallParser reads them, the grammar to match."""

    name = "tag-calls"

    def __init__(self, inner: ChatFormat) -> None:
        super().__init__(inner.tokenizer)
        self.inner = inner
        self.stop_token_ids = inner.stop_token_ids

    def render(self, messages, *, tools=None, add_generation_prompt=True, thinking=None) -> ChatPrompt:
        if tools:
            names = ", ".join(t["function"]["name"] for t in tools)
            messages = [{"role": "system", "content": f"Call one of: {names}."}, *messages]
        return self.inner.render(messages, add_generation_prompt=add_generation_prompt)

    def reply_parser(self, *, tools=None, thinking=None) -> ReplyParser:
        return TagCallParser(bool(thinking))

    def tool_grammar(self, tools, tool_choice, *, parallel=True):
        if isinstance(tool_choice, dict):
            tools = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "arguments": t["function"]["parameters"]},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        call = f'"{OPEN}" %json {json.dumps({"anyOf": calls})} "{CLOSE}"'
        if tool_choice == "auto":
            return f"start: TEXT | {call}\nTEXT: /[^<](.|\\n)*/"
        return f"start: {call}"


@pytest.fixture(scope="module")
def engine(bundled):
    model, _ = bundled
    tooled = copy.copy(model)  # the same weights, another chat format
    tooled.chat_format = TagCallFormat(model.chat_format)
    tooled._engine = None
    engine = AsyncEngine(tooled, kv_cache_bytes=64 << 20)
    yield engine
    engine.shutdown()


def collect(engine: AsyncEngine, **fields) -> list[GenerationEvent]:
    async def main() -> list[GenerationEvent]:
        request = GenerateRequest("t", fields.pop("params", SamplingParams(do_sample=False, max_tokens=80)),
                                  messages=[{"role": "user", "content": "What's the weather in Paris?"}], **fields)
        return [event async for event in engine.generate(request)]

    return asyncio.run(main())


def calls_of(events: list[GenerationEvent]) -> list[ToolCallDelta]:
    return [call for event in events for call in event.tool_calls]


def test_forced_call_is_parsed_and_ends_with_tool_calls(engine) -> None:
    events = collect(engine, tools=[WEATHER, CLOCK],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = calls_of(events)
    assert (call.index, call.id, call.name) == (0, "call_0", "get_weather")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    assert events[-1].finish_reason == "tool_calls"
    assert "".join(e.text for e in events) == ""  # the call is not content


@pytest.mark.parametrize("sampled", [False, True])
def test_required_call_picks_an_offered_tool(engine, sampled: bool) -> None:
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=80) if sampled else None
    events = collect(engine, tools=[WEATHER, CLOCK], tool_choice="required",
                     **({"params": params} if params else {}))
    (call,) = calls_of(events)
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]
    jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])
    assert events[-1].finish_reason == "tool_calls"


def test_tool_choice_none_is_free_text(engine) -> None:
    events = collect(engine, tools=[WEATHER], tool_choice="none",
                     params=SamplingParams(do_sample=False, max_tokens=12))
    assert not calls_of(events)
    assert events[-1].finish_reason in ("stop", "length")
    assert "".join(e.text for e in events)


def test_reasoning_comes_out_as_reasoning(engine) -> None:
    """A thinking reply's text goes to `reasoning` until the parser sees "</think>" (this model never writes
    one, so all of it is reasoning)."""
    events = collect(engine, thinking=True, params=SamplingParams(do_sample=False, max_tokens=12))
    assert "".join(e.reasoning for e in events) and not "".join(e.text for e in events)
    assert events[-1].finish_reason == "length"


def test_one_at_a_time_path_parses_replies_too(bundled) -> None:
    """The reference loop (ChatGLM-6B's path) gets the same reply parsing; constraints are not applied there."""
    model, _ = bundled
    tooled = copy.copy(model)
    tooled.chat_format = TagCallFormat(model.chat_format)
    tooled._engine = None
    engine = AsyncEngine(tooled, batched=False)
    try:
        events = collect(engine, thinking=True, params=SamplingParams(do_sample=False, max_tokens=8))
    finally:
        engine.shutdown()
    assert "".join(e.reasoning for e in events) and not "".join(e.text for e in events)


def test_stream_decoder_keeps_the_formats_reply_tokens(bundled) -> None:
    _, tokenizer = bundled
    end = tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Hi") + [end] + tokenizer.encode(" there")

    def stream(**kwargs) -> str:
        decoder = tokenizer.stream_decoder(**kwargs)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    assert stream() == "Hi there"
    assert stream(keep=frozenset({end})) == "Hi<|im_end|> there"
