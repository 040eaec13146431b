"""Tool calls, reasoning, response_format, thinking and personas on the wire (spec §2.1, §2.2.3, §3), with the
scripted engine writing exactly the pieces the real one does, read back by the openai SDK through the app's
own HTTP client (zhipuai and zai-sdk, whose clients are httpx2's, against the real server in
tests/test_tools_end_to_end.py)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from scripted import CHAT, ScriptedEngine, chat_body, error_of, sse_events

from glmstack.protocol import GenerationEvent, InvalidConstraintError, ToolCallDelta

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ARGUMENTS = '{"city": "北京"}'


def call_events(arguments: str = ARGUMENTS, *, reasoning: str = "") -> list[GenerationEvent]:
    """A reply that is one streamed call of get_weather (after some reasoning, when given)."""
    events = [GenerationEvent("", [1], reasoning=part) for part in reasoning.split(" ") if reasoning]
    events.append(GenerationEvent("", [1], tool_calls=[ToolCallDelta(0, "call_abc123", "get_weather", "")]))
    half = len(arguments) // 2
    events += [GenerationEvent("", [1], tool_calls=[ToolCallDelta(0, arguments=piece)])
               for piece in (arguments[:half], arguments[half:])]
    events.append(GenerationEvent("", [], finish_reason="tool_calls"))
    return events


def sdk(client: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/api/paas/v4/", http_client=client, max_retries=0)


def test_a_tool_call_reply_through_the_sdk(client: TestClient, engine: ScriptedEngine, key: str) -> None:
    engine.events = call_events()
    api = sdk(client, key)
    messages = [{"role": "user", "content": "北京天气？"}]
    response = api.chat.completions.create(model="glm-4", messages=messages, tools=[WEATHER])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_abc123", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "北京"}
    # the documentation's round trip: the message as returned goes back into the conversation
    engine.events = None
    follow_up = [*messages, choice.message.model_dump(),
                 {"role": "tool", "content": '{"temp": 22}', "tool_call_id": call.id}]
    assert api.chat.completions.create(model="glm-4", messages=follow_up, tools=[WEATHER]).choices[0]
    sent = engine.requests[-1].messages
    assert sent[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": call.function.arguments}
    assert sent[2] == {"role": "tool", "content": '{"temp": 22}', "tool_call_id": "call_abc123"}


def test_a_streamed_tool_call_through_the_sdk(client: TestClient, engine: ScriptedEngine, key: str) -> None:
    engine.events = call_events(reasoning="first the city")
    chunks = list(sdk(client, key).chat.completions.create(
        model="glm-4", messages=[{"role": "user", "content": "北京天气？"}], tools=[WEATHER], stream=True))
    name, arguments, reasoning, finish = "", "", "", None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for piece in delta.tool_calls or []:
            assert piece.index == 0
            name += piece.function.name or ""
            arguments += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, json.loads(arguments), finish) == ("get_weather", {"city": "北京"}, "tool_calls")
    assert reasoning == "firstthecity"
    assert chunks[-1].usage.completion_tokens == len(engine.events)


def test_stream_wire_shape(client: TestClient, engine: ScriptedEngine) -> None:
    engine.events = call_events()
    response = client.post(CHAT, json=chat_body(tools=[WEATHER], stream=True))
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]]
    first = chunks[0]["choices"][0]["delta"]
    # the call's first piece: id, type and name, no content key (spec: content is null when a function is hit)
    assert first == {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_abc123", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    later = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert set(later) == {"index", "function"} and set(later["function"]) == {"arguments"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and "usage" in chunks[-1]


def test_reasoning_and_content_in_a_reply(client: TestClient, engine: ScriptedEngine) -> None:
    engine.events = [GenerationEvent("", [1], reasoning="Think."), GenerationEvent("Answer.", [1]),
                     GenerationEvent("", [], finish_reason="stop")]
    message = client.post(CHAT, json=chat_body()).json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Answer.", "reasoning_content": "Think."}


def test_invalid_arguments_come_back_as_written(client: TestClient, engine: ScriptedEngine) -> None:
    engine.events = call_events('{"city": 北京')
    body = client.post(CHAT, json=chat_body(tools=[WEATHER])).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": 北京'


def test_tool_choice_forms(client: TestClient, engine: ScriptedEngine) -> None:
    for sent, expected in [
        (None, "auto"),
        ("auto", "auto"),
        ("required", "required"),
        ({"type": "function", "function": {"name": "get_weather"}},
         {"type": "function", "function": {"name": "get_weather"}}),
        ({"name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),  # the doc's form
    ]:
        assert client.post(CHAT, json=chat_body(tools=[WEATHER], tool_choice=sent)).status_code == 200
        assert engine.requests[-1].tool_choice == expected and engine.requests[-1].tools == [WEATHER]
    assert engine.requests[-1].parallel_tool_calls is True
    assert client.post(CHAT, json=chat_body(tools=[WEATHER], parallel_tool_calls=False)).status_code == 200
    assert engine.requests[-1].parallel_tool_calls is False
    # "none": the model is not shown the tools at all (as the official GLM-4 server does)
    assert client.post(CHAT, json=chat_body(tools=[WEATHER], tool_choice="none")).status_code == 200
    assert engine.requests[-1].tools is None and engine.requests[-1].tool_choice is None


@pytest.mark.parametrize("tool_choice", [
    {"type": "function", "function": {"name": "get_time"}},  # not among the tools
    "sometimes",
    {"type": "function"},
    {"name": "bad name!"},
])
def test_bad_tool_choice(client: TestClient, tool_choice: Any) -> None:
    response = client.post(CHAT, json=chat_body(tools=[WEATHER], tool_choice=tool_choice))
    assert error_of(response) == (400, "1214") and "tool_choice" in response.json()["error"]["message"]


def test_forced_tool_choice_without_tools(client: TestClient) -> None:
    for choice in ("required", {"name": "get_weather"}):
        assert error_of(client.post(CHAT, json=chat_body(tool_choice=choice))) == (400, "1214")


def test_response_format_reaches_the_engine(client: TestClient, engine: ScriptedEngine) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    body = chat_body(response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema}})
    assert client.post(CHAT, json=body).status_code == 200
    assert engine.requests[-1].response_format == {
        "type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": None}}
    assert client.post(CHAT, json=chat_body(response_format={"type": "json_object"})).status_code == 200
    assert engine.requests[-1].response_format == {"type": "json_object"}
    for free in ({"type": "text"}, None):
        assert client.post(CHAT, json=chat_body(response_format=free)).status_code == 200
        assert engine.requests[-1].response_format is None
    for bad in ({"type": "json_schema"}, {"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": []}}):
        response = client.post(CHAT, json=chat_body(response_format=bad))
        assert error_of(response) == (400, "1214") and "response_format" in response.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_the_engine_refuses_is_1214(client: TestClient, engine: ScriptedEngine, stream: bool) -> None:
    engine.error = InvalidConstraintError("$ref cycle", "response_format.json_schema.schema")
    body = chat_body(stream=stream, response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    response = client.post(CHAT, json=body)
    assert error_of(response) == (400, "1214")
    message = response.json()["error"]["message"]
    assert "response_format.json_schema.schema" in message and "$ref cycle" in message


def test_thinking_switch(client: TestClient, engine: ScriptedEngine) -> None:
    for sent, expected in [({"type": "enabled"}, True), ({"type": "disabled"}, False), (None, None)]:
        assert client.post(CHAT, json=chat_body(thinking=sent)).status_code == 200
        assert engine.requests[-1].thinking is expected


META = {"user_info": "我是陆星辰，一位导演。", "bot_info": "苏梦远，一位歌手。", "bot_name": "苏梦远",
        "user_name": "陆星辰"}


@pytest.mark.parametrize("model", ["charglm-3", "emohaa"])
def test_personas(client: TestClient, engine: ScriptedEngine, model: str) -> None:
    messages = [{"role": "assistant", "content": "导演，您好。"}, {"role": "user", "content": "开始吧。"}]
    for stream in (False, True):
        response = client.post(CHAT, json={"model": model, "meta": META, "messages": messages, "stream": stream})
        assert response.status_code == 200
        sent = engine.requests[-1].messages
        assert sent[0]["role"] == "system" and "苏梦远" in sent[0]["content"] and "陆星辰" in sent[0]["content"]
        assert sent[1:] == messages
    if not stream:
        assert response.json()["model"] == model
    assert error_of(client.post(CHAT, json={"model": model, "messages": messages})) == (400, "1213")
    system = [{"role": "system", "content": "x"}, *messages]
    assert error_of(client.post(CHAT, json={"model": model, "meta": META, "messages": system})) == (400, "1214")


def test_assistant_history_as_the_sdks_send_it(client: TestClient, engine: ScriptedEngine) -> None:
    """`message.model_dump()` sends content null, reasoning_content null and the call's index back."""
    call = {"id": "call_1", "type": "function", "index": 0,
            "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    messages = [{"role": "user", "content": "北京天气？"},
                {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [call]},
                {"role": "tool", "content": "晴", "tool_call_id": "call_1"}]
    assert client.post(CHAT, json=chat_body(messages=messages, tools=[WEATHER])).status_code == 200
    assert "reasoning_content" not in engine.requests[-1].messages[1]
