"""Tool calls and structured output end to end (issue 16): `glmstack serve` on real checkpoints, read back by the
official SDKs (zhipuai, zai-sdk, openai), sync and stream.

- Tiny GLM checkpoints of each family scripted to write a call in the family's own syntax (tests/scripted_models.py:
  greedy decoding walks a bigram table), served unconstrained: the server must find the call in the text.
- The same checkpoints with a forced `tool_choice`: the grammar makes whatever the random model prefers into a
  call of the named function whose arguments follow its schema.
- The bundled SmolLM2 model: the platform documentation's function-calling example (get_flight_number /
  get_ticket_price, the assistant message appended with `model_dump()`), and json_schema replies checked with
  `jsonschema`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import zhipuai
from scripted_models import scripted_reply
from servers import serving
from test_glm_chat import chatglm2, glm4_0414, glm4_9b_chat
from zai import ZhipuAiClient

import glmstack

pytestmark = pytest.mark.slow

NO_ARGUMENTS = {"type": "function", "function": {
    "name": "f", "description": "Takes no arguments", "parameters": {"type": "object", "properties": {}}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Beijing", "Shanghai"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}
ASK = [{"role": "user", "content": "What's the weather?"}]
# The scripted reply per family, in its own call syntax, and the token it ends with. The tiny GLM-4 tokenizer
# is close to character level, so a call without arguments is the one whose tokens do not repeat.
SCRIPTS = {
    "glm4-9b-chat": ("f\n{}", "<|observation|>"),
    "glm4-0414": ("f\n{}", "<|observation|>"),
}
BUILDERS: dict[str, Callable[[Path], None]] = {
    "glm4-9b-chat": glm4_9b_chat,
    "glm4-0414": glm4_0414,
    "chatglm3": lambda folder: chatglm2(folder, chatglm3=True),
}
SDKS = ["openai", "zhipuai", "zai"]


def client(kind: str, url: str) -> Any:
    if kind == "openai":
        return openai.OpenAI(api_key="unused", base_url=f"{url}/v1", max_retries=0)
    make = zhipuai.ZhipuAI if kind == "zhipuai" else ZhipuAiClient
    return make(api_key="id.secret", base_url=f"{url}/api/paas/v4", max_retries=0)


def serve(folder: Path | None, home: Path) -> Iterator[str]:
    """`glmstack serve` on the loopback (open, no keys) for the checkpoint in `folder` (None: the bundled model)."""
    env = {**os.environ, "GLMSTACK_HOME": str(home), "GLMSTACK_DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}"}
    args = ["--port", "0", "--device", "cpu"] + (["--model", str(folder), "--dtype", "float32"] if folder else [])
    with serving(args, env, home / "server.log") as (_, url):
        yield url


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family_server(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    BUILDERS[family](folder)
    if family in SCRIPTS:
        reply, stop = SCRIPTS[family]
        _, tokenizer = glmstack.load(folder, device="cpu", dtype="float32")

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False, allow_special=False)

        scripted_reply(folder, encode, tokenizer.token_to_id("<|assistant|>"), reply, tokenizer.token_to_id(stop))
    for url in serve(folder, tmp_path_factory.mktemp("home")):
        yield family, url


def streamed_call(chunks: list[Any]) -> tuple[str, str, str | None]:
    name, arguments, finish = "", "", None
    for chunk in chunks:
        for piece in chunk.choices[0].delta.tool_calls or []:
            name += piece.function.name or ""
            arguments += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return name, arguments, finish


@pytest.mark.parametrize("sdk", SDKS)
def test_a_scripted_call_is_found_in_the_text(family_server: tuple[str, str], sdk: str) -> None:
    family, url = family_server
    if family not in SCRIPTS:
        pytest.skip(f"no scripted reply for {family}'s tokenizer")
    api = client(sdk, url)
    reply = api.chat.completions.create(model="glm-4", messages=ASK, tools=[NO_ARGUMENTS], temperature=0,
                                        max_tokens=16)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments), call.type) == ("f", {}, "function")
    assert call.id.startswith("call_") and not choice.message.content
    chunks = list(api.chat.completions.create(model="glm-4", messages=ASK, tools=[NO_ARGUMENTS], temperature=0,
                                              max_tokens=16, stream=True))
    assert streamed_call(chunks) == ("f", "{}", "tool_calls")
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


@pytest.mark.parametrize("sdk", SDKS)
def test_a_forced_call_follows_the_schema(family_server: tuple[str, str], sdk: str) -> None:
    _, url = family_server
    api = client(sdk, url)
    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = api.chat.completions.create(model="glm-4", messages=ASK, tools=[NO_ARGUMENTS, WEATHER],
                                        tool_choice=forced, temperature=0, max_tokens=128)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(api.chat.completions.create(model="glm-4", messages=ASK, tools=[NO_ARGUMENTS, WEATHER],
                                              tool_choice=forced, temperature=0, max_tokens=128, stream=True))
    name, arguments, finish = streamed_call(chunks)
    assert (name, finish) == ("get_weather", "tool_calls")
    assert json.loads(arguments) == json.loads(call.function.arguments)  # greedy: the same call both ways


# ---- the bundled model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(None, tmp_path_factory.mktemp("home"))


# The platform documentation's function-calling guide, as its Python example sends it.
FLIGHT_TOOLS = [
    {"type": "function", "function": {
        "name": "get_flight_number", "description": "根据始发地、目的地和日期，查询对应日期的航班号",
        "parameters": {"type": "object", "properties": {
            "departure": {"description": "出发地", "type": "string"},
            "destination": {"description": "目的地", "type": "string"},
            "date": {"description": "日期", "type": "string"}},
            "required": ["departure", "destination", "date"]}}},
    {"type": "function", "function": {
        "name": "get_ticket_price", "description": "查询某航班在某日的票价",
        "parameters": {"type": "object", "properties": {
            "flight_number": {"description": "航班号", "type": "string"},
            "date": {"description": "日期", "type": "string"}},
            "required": ["flight_number", "date"]}}},
]


@pytest.mark.parametrize("sdk", SDKS)
def test_the_documentation_function_calling_example(bundled_server: str, sdk: str) -> None:
    api = client(sdk, bundled_server)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "帮我查询从2024年1月20日，从北京出发前往上海的航班"}]
    response = api.chat.completions.create(
        model="glm-4", messages=messages, tools=FLIGHT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_flight_number"}}, max_tokens=96)
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "get_flight_number"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, FLIGHT_TOOLS[0]["function"]["parameters"])
    messages.append(response.choices[0].message.model_dump())
    messages.append({"role": "tool", "content": json.dumps({"flight_number": "1026"}), "tool_call_id": call.id})
    # the guide's next turn forces get_ticket_price
    response = api.chat.completions.create(
        model="glm-4", messages=messages, tools=FLIGHT_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_ticket_price"}}, max_tokens=96)
    assert response.choices[0].message.tool_calls[0].function.name == "get_ticket_price"
    messages.append(response.choices[0].message.model_dump())
    messages.append({"role": "tool", "content": "1000", "tool_call_id": response.choices[0].message.tool_calls[0].id})
    final = api.chat.completions.create(model="glm-4", messages=messages, tools=FLIGHT_TOOLS, max_tokens=24)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "languages": {"type": "array", "items": {"type": "string", "enum": ["en", "zh", "fr"]}, "maxItems": 3}},
    "required": ["name", "age", "languages"], "additionalProperties": False}


@pytest.mark.parametrize("sdk", SDKS)
def test_json_schema_replies_validate(bundled_server: str, sdk: str) -> None:
    api = client(sdk, bundled_server)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    reply = api.chat.completions.create(model="glm-4", messages=ask, response_format=response_format,
                                        max_tokens=96, temperature=0.8, seed=1)
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    # streamed; the schema bounds the reply (a bare json_object may outrun any max_tokens: tests/test_constrained.py)
    chunks = list(api.chat.completions.create(model="glm-4", messages=ask, response_format=response_format,
                                              max_tokens=96, temperature=0.8, seed=2, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON)


def hostile_cases() -> list[tuple[str, dict[str, Any], str | None]]:
    """(what, request fields, the field a refusal names; None: served)."""
    many = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}}}} for i in range(128)]
    recursive = {"type": "object", "properties": {"node": {"$ref": "#/$defs/node"}},
                 "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}}}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "object", "properties": {"v": {"type": "string"}}}
                                             for i in range(16_000)}}
    return [
        ("128 tools", {"tools": many, "tool_choice": "required"}, None),
        ("129 tools", {"tools": many + many[:1]}, "tools"),
        ("a recursive $ref", {"response_format": {"type": "json_schema", "json_schema": {"schema": recursive}}}, None),
        ("a 1 MB schema", {"response_format": {"type": "json_schema", "json_schema": {"schema": huge}}},
         "response_format.json_schema.schema"),
        ("parameters of the wrong type", {"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}}],
            "tool_choice": "required"}, "tools[0].function.parameters"),
        ("a schema that is not an object", {"response_format": {"type": "json_schema", "json_schema": {
            "schema": ["x"]}}}, "response_format"),
        ("a tool_choice naming no tool", {"tools": many[:1], "tool_choice": {"name": "nope"}}, "tool_choice"),
    ]


@pytest.mark.parametrize(("what", "fields", "refused"), hostile_cases(), ids=[c[0] for c in hostile_cases()])
def test_hostile_tools_and_schemas(bundled_server: str, what: str, fields: dict[str, Any],
                                   refused: str | None) -> None:
    body = {"model": "glm-4", "messages": ASK, "max_tokens": 8, **fields}
    response = httpx.post(f"{bundled_server}/api/paas/v4/chat/completions", json=body, timeout=120)
    if refused is None:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] in ("1213", "1214") and refused in error["message"], error
    assert httpx.get(f"{bundled_server}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("sdk", ["openai", "zai"])
def test_required_with_one_call_at_most(bundled_server: str, sdk: str) -> None:
    """`tool_choice: "required"` with `parallel_tool_calls: false`: exactly one call, and the reply ends there
    (a small model allowed more keeps writing calls until max_tokens)."""
    api = client(sdk, bundled_server)
    ask = [{"role": "user", "content": "What is the flight number from Beijing to Shanghai on 2024-01-20?"}]
    extra = {"parallel_tool_calls": False}
    reply = api.chat.completions.create(model="glm-4", messages=ask, tools=FLIGHT_TOOLS, tool_choice="required",
                                        max_tokens=128, extra_body=extra)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    tool = next(t for t in FLIGHT_TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_a_client_generated_from_the_openapi_document(bundled_server: str, tmp_path: Path) -> None:
    """openapi-python-client turns the server's /openapi.json into a typed client; that client sends a request
    with tools and gets back a parsed completion carrying the call."""
    (tmp_path / "openapi.json").write_text(httpx.get(f"{bundled_server}/openapi.json", timeout=30).text)
    subprocess.run(["openapi-python-client", "generate", "--path", "openapi.json", "--output-path",
                    "generated_client", "--meta", "none"], cwd=tmp_path, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    sys.path.insert(0, str(tmp_path))
    try:
        from generated_client.api.chat import (
            create_chat_completion_api_paas_v4_chat_completions_post as create,
        )
        from generated_client.client import Client
        from generated_client.models import ChatCompletion, ChatCompletionRequest
    finally:
        sys.path.remove(str(tmp_path))
    body = ChatCompletionRequest.from_dict({
        "model": "glm-4", "messages": ASK, "tools": FLIGHT_TOOLS, "max_tokens": 96,
        "tool_choice": {"type": "function", "function": {"name": "get_flight_number"}}})
    reply = create.sync(client=Client(base_url=bundled_server, timeout=httpx.Timeout(120)), body=body)
    assert isinstance(reply, ChatCompletion), reply
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_flight_number" and reply.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), FLIGHT_TOOLS[0]["function"]["parameters"])
