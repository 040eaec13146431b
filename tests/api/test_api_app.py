"""The HTTP service in-process, against a scripted engine and a real store (SQLite and PostgreSQL): response
shapes, the error envelope on every invalid request, the classic endpoint, health and metrics.

Auth, limits and safety are in test_api_access.py; the real model, server and SDKs in test_api_server.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scripted import CHAT, ScriptedEngine, chat_body, client_ok, error_of, sse_events, written_usage

from glmstack.protocol import EngineOverloadedError, GenerationDefaults, PromptTooLongError
from glmstack.store import Store

# ---- the happy paths --------------------------------------------------------------------------------------


def test_sync_completion(client: TestClient, store: Store, engine: ScriptedEngine) -> None:
    body = chat_body(
        request_id="my-request-1",
        temperature=0.5,
        top_p=0.9,
        max_tokens=20,
        stop="END",
        do_sample=True,
        seed=7,
        user_id="end-user-42",
    )
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["request_id"] == "my-request-1" and data["id"] == response.headers["x-request-id"]
    assert data["model"] == "glm-4" and data["object"] == "chat.completion"
    assert data["choices"] == [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello there!"}}
    ]
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    params = engine.requests[-1].params
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (
        0.5,
        0.9,
        20,
        ["END"],
        7,
    )
    [row] = written_usage(store, client)
    assert (row.model, row.requests, row.prompt_tokens, row.completion_tokens) == ("scripted-1b", 1, 4, 3)


def test_defaults_and_greedy(client: TestClient, engine: ScriptedEngine) -> None:
    client.post(CHAT, json=chat_body())
    params = engine.requests[-1].params
    assert (params.temperature, params.top_p, params.max_tokens, params.do_sample) == (0.95, 0.7, 1024, True)
    client.post(CHAT, json=chat_body(do_sample=False, temperature=0.3))
    assert engine.requests[-1].params.greedy
    client.post(CHAT, json=chat_body(temperature=0, top_p=0))  # what the OpenAI SDK may send
    assert engine.requests[-1].params.greedy and engine.requests[-1].params.top_p > 0


def test_sdk_nulls_and_unknown_fields_are_ignored(client: TestClient) -> None:
    body = chat_body(
        response_format=None,
        thinking=None,
        sensitive_word_check={"type": "ALL", "status": "ENABLE"},
        meta=None,
        extra=None,
        watermark_enabled=None,
        tools=None,
        tool_choice=None,
        stop=None,
        stream=None,
        stream_options={"include_usage": True},
        n=1,
        user="u",
        something_new=[1],
    )
    assert client.post(CHAT, json=body).status_code == 200


def test_message_kinds(client: TestClient, engine: ScriptedEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What's the "}, {"type": "text", "text": "weather?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "index": 0,
                    "function": {"name": "weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert (
        client.post(CHAT, json=chat_body(messages=messages, tools=tools, tool_choice="auto")).status_code
        == 200
    )
    sent = engine.requests[-1]
    assert sent.tools == tools
    assert sent.messages[1] == {"role": "user", "content": "What's the weather?"}
    assert sent.messages[2]["tool_calls"][0]["id"] == "call_1" and sent.messages[2]["content"] == ""
    assert sent.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_stream_framing(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in response.headers
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello there!"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "glm-4" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c and "finish_reason" not in c["choices"][0] for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_length_finish(client: TestClient, engine: ScriptedEngine) -> None:
    engine.finish = "length"
    assert client.post(CHAT, json=chat_body()).json()["choices"][0]["finish_reason"] == "length"
    engine.finish = "abort"  # the engine gave up on its own
    assert client.post(CHAT, json=chat_body()).json()["choices"][0]["finish_reason"] == "network_error"


def test_failure_mid_stream_ends_it_with_network_error(client: TestClient, engine: ScriptedEngine) -> None:
    engine.fail_after = 2
    events = sse_events(client.post(CHAT, json=chat_body(stream=True)).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert (
        events[-1] == "[DONE]"
        and "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello there"
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "network_error"
    assert client.post(CHAT, json=chat_body()).json()["choices"][0]["finish_reason"] == "network_error"


def test_models(client: TestClient) -> None:
    for prefix in ("/api/paas/v4", "/v1"):
        listing = client.get(f"{prefix}/models").json()
        ids = [m["id"] for m in listing["data"]]
        assert listing["object"] == "list" and ids[0] == "scripted-1b" and "glm-4" in ids
        assert all(m["root"] == "scripted-1b" for m in listing["data"])
    assert client.get("/v1/models/GLM-4-Flash").json()["id"] == "GLM-4-Flash"
    assert error_of(client.get("/v1/models/gpt-4")) == (404, "1211")


def test_omitted_sampling_takes_the_models_own_defaults(client: TestClient, engine: ScriptedEngine) -> None:
    def sampled(**body: Any) -> tuple[float, float, int | None]:
        assert client.post(CHAT, json=chat_body(**body)).status_code == 200
        params = engine.requests[-1].params
        return params.temperature, params.top_p, params.max_tokens

    card = client.get("/v1/models/glm-4").json()["generation_defaults"]
    assert card == {"temperature": 0.95, "top_p": 0.7, "max_tokens": 1024, "source": "platform"}
    assert sampled() == (0.95, 0.7, 1024)  # the platform's documented defaults
    engine.generation_defaults = GenerationDefaults(0.2, 0.9, 256, source="model card: Scripted")
    assert sampled() == (0.2, 0.9, 256)
    assert sampled(temperature=0.5, top_p=0.3, max_tokens=7) == (0.5, 0.3, 7)  # the request wins
    engine.generation_defaults = GenerationDefaults(top_p=0.5, source="generation_config.json")
    assert sampled() == (0.95, 0.5, 1024)  # what the model leaves out, the platform fills in
    card = client.get("/api/paas/v4/models").json()["data"][0]["generation_defaults"]
    assert card == {"temperature": 0.95, "top_p": 0.5, "max_tokens": 1024, "source": "generation_config.json"}


@pytest.mark.parametrize("code", ["glm-4.5", "GLM-4.5-Air", "glm-4.5-flash", "glm-4.6", "glm-4.7", "glm-z1-flash",
                                  "glm-4-flash-250414", "glm-4-32b-0414-128k", "glm-4-plus"])
def test_todays_model_codes_are_answered(client: TestClient, code: str) -> None:
    reply = client.post(CHAT, json=chat_body(model=code))
    assert reply.status_code == 200 and reply.json()["model"] == code
    assert code.lower() in {m["id"].lower() for m in client.get("/v1/models").json()["data"]}


@pytest.mark.parametrize(("code", "capability"), [("glm-4v-plus", "vision"), ("glm-4.5v", "vision"),
                                                  ("embedding-3", "embeddings"), ("cogview-3-plus", "image")])
def test_a_code_of_another_capability_is_refused_not_substituted(client: TestClient, code: str,
                                                                 capability: str) -> None:
    reply = client.post(CHAT, json=chat_body(model=code))
    assert error_of(reply) == (400, "1211") and capability in reply.json()["error"]["message"]


def test_aliases_from_settings(make_client, key: str) -> None:
    client = make_client(model_aliases={"my-app-model": "glm-4", "gpt-4o-mini": "scripted-1b"})
    client.headers["Authorization"] = f"Bearer {key}"
    ids = [m["id"] for m in client.get("/api/paas/v4/models").json()["data"]]
    assert ids[-2:] == ["my-app-model", "gpt-4o-mini"]
    assert client.post(CHAT, json=chat_body(model="My-App-Model")).status_code == 200
    assert error_of(client.post(CHAT, json=chat_body(model="gpt-4o"))) == (400, "1211")
    with pytest.raises(ValueError, match="'gpt-5' is not a model this server answers to"):
        make_client(model_aliases={"x": "gpt-5"})


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected", "field"),
    [
        (chat_body(model="no-such-model"), (400, "1211"), None),
        ({"messages": [{"role": "user", "content": "hi"}]}, (400, "1213"), "model"),
        ({"model": "glm-4"}, (400, "1213"), "messages"),
        (chat_body(messages=[]), (400, "1214"), "messages"),
        (chat_body(temperature=1.5), (400, "1214"), "temperature"),
        (chat_body(top_p=-0.1), (400, "1214"), "top_p"),
        (chat_body(max_tokens=0), (400, "1214"), "max_tokens"),
        (chat_body(max_tokens="many"), (400, "1214"), "max_tokens"),
        (chat_body(messages=[{"role": "robot", "content": "hi"}]), (400, "1214"), "messages[0].role"),
        (chat_body(messages=[{"role": "user"}]), (400, "1213"), "messages[0].content"),
        (
            chat_body(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
            ),
            (400, "1214"),
            "messages[0].content",
        ),
        (chat_body(stop=[""]), (400, "1214"), "stop"),
        # a lone surrogate: valid JSON, not text (it would fail in the tokenizer or when echoed back)
        (chat_body(messages=[{"role": "user", "content": "\ud800"}]), (400, "1214"), "messages[0].content"),
        (chat_body(request_id="\udfff"), (400, "1214"), "request_id"),
        (chat_body(tools=[{"type": "function"}]), (400, "1214"), "tools[0]"),
        (
            chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]),
            (400, "1214"),
            "tools[0].function.name",
        ),
        (chat_body(user_id="abc"), (400, "1214"), "user_id"),
        (chat_body(n=2), (400, "1214"), "n"),
        ([1, 2], (400, "1210"), None),
    ],
)
def test_invalid_requests(
    client: TestClient, body: Any, expected: tuple[int, str], field: str | None
) -> None:
    # json.dumps escapes what httpx's json= would refuse to encode (the lone surrogates)
    response = client.post(CHAT, content=json.dumps(body), headers={"content-type": "application/json"})
    assert error_of(response) == expected
    if field is not None:
        assert f"{field}参数" in response.json()["error"]["message"]  # the doc's "${field}参数..." template


def test_malformed_json_and_missing_content_type(client: TestClient) -> None:
    assert error_of(client.post(CHAT, content=b'{"model": ')) == (400, "1210")
    # no Content-Type at all is still read as JSON
    response = client.post(CHAT, content=json.dumps(chat_body()).encode(), headers={"content-type": ""})
    assert response.status_code == 200
    assert error_of(client.post(CHAT, data={"model": "glm-4"})) == (400, "1210")  # a form


def test_unknown_paths_and_methods(client: TestClient) -> None:
    assert error_of(client.get("/api/paas/v4/nothing-here")) == (404, "1222")
    assert error_of(client.get(CHAT)) == (405, "1222")
    assert error_of(client.delete("/")) == (405, "1222")


def test_limits_on_tokens_and_messages(make_client, key: str) -> None:
    c = make_client(max_tokens_cap=100, max_messages=3)
    c.headers["Authorization"] = key
    assert client_ok(c, chat_body(max_tokens=100))
    assert error_of(c.post(CHAT, json=chat_body(max_tokens=101))) == (400, "1214")
    c.post(CHAT, json=chat_body())  # the default is capped, not refused
    messages = [{"role": "user", "content": "hi"}] * 4
    assert error_of(c.post(CHAT, json=chat_body(messages=messages))) == (400, "1214")


def test_tiny_temperatures_are_clamped(client: TestClient, engine: ScriptedEngine) -> None:
    # logits / 1e-300 is inf: the sampler would fail the whole batch's step
    assert client_ok(client, chat_body(temperature=1e-300, top_p=5e-324))
    assert (engine.requests[-1].params.temperature, engine.requests[-1].params.top_p) == (0.01, 0.01)
    client.post("/", json={"prompt": "hi", "temperature": 1e-300})
    assert engine.requests[-1].params.temperature == 0.01


def test_max_tokens_is_bounded_by_the_context(client: TestClient, engine: ScriptedEngine) -> None:
    context = engine.info().context_length
    assert client_ok(client, chat_body(max_tokens=context))
    assert error_of(client.post(CHAT, json=chat_body(max_tokens=context + 1))) == (400, "1214")
    # The classic endpoint's max_length (prompt plus reply) is clamped instead: ChatGLM's demos send 32768
    assert client.post("/", json={"prompt": "hi", "max_length": 10**9}).status_code == 200
    assert engine.requests[-1].params.max_tokens < context


def test_tools_are_passed_on_as_sent(client: TestClient, engine: ScriptedEngine) -> None:
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {}}, "strict": True}
    tools = [
        {"type": "function", "function": function},
        {"type": "python"},
        {"type": "web_search", "web_search": {"enable": True}},
    ]
    assert client_ok(client, chat_body(tools=tools))
    # function tools (extra keys kept) and the model's built-in ones go to the model; the platform's own
    # tools (web_search, retrieval) are not the model's to call
    assert engine.requests[-1].tools == tools[:2]
    assert engine.requests[-1].tool_choice == "auto"


def test_request_head_checks(client: TestClient) -> None:
    for host in ("evil.example/health", "a?b", "user@host"):
        assert error_of(client.get("/api/paas/v4/models", headers={"host": host})) == (400, "1214")
    assert client.get("/api/paas/v4/models", headers={"host": "[::1]:8000"}).status_code == 200
    assert error_of(client.get("/api/paas/v4/models", headers={"x-padding": "a" * 20_000})) == (400, "1210")


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals(client: TestClient, engine: ScriptedEngine, stream: bool) -> None:
    engine.error = PromptTooLongError("prompt is 9000 tokens; the context is 4096")
    response = client.post(CHAT, json=chat_body(stream=stream))
    assert error_of(response) == (400, "1261") and "9000" in response.json()["error"]["message"]
    engine.error = EngineOverloadedError("engine queue is full")
    assert error_of(client.post(CHAT, json=chat_body(stream=stream))) == (429, "1305")


# ---- classic api.py, health, metrics ----------------------------------------------------------------------


def test_classic_endpoint(client: TestClient, engine: ScriptedEngine) -> None:
    data = client.post(
        "/",
        json={
            "prompt": "hi",
            "history": [["hello", "hey"]],
            "max_length": 64,
            "top_p": 0.5,
            "temperature": 0.1,
        },
    ).json()
    assert data["response"] == "Hello there!" and data["status"] == 200
    assert data["history"] == [["hello", "hey"], ["hi", "Hello there!"]]
    assert len(data["time"]) == len("2024-01-01 12:00:00")
    request = engine.requests[-1]
    assert [m["role"] for m in request.messages] == ["user", "assistant", "user"]
    assert request.params.max_tokens == 64 - engine.count_prompt_tokens(request.messages)
    chatglm3 = client.post(
        "/",
        json={
            "prompt": "hi",
            "history": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
    ).json()
    assert chatglm3["history"][-2:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there!"},
    ]
    assert error_of(client.post("/", json={"prompt": "hi", "max_length": 3})) == (400, "1261")
    assert error_of(client.post("/", json={"prompt": "hi", "history": [1, 2]})) == (400, "1214")
    surrogate = json.dumps({"prompt": "hi", "history": [["\ud800", "a"]]})
    assert error_of(client.post("/", content=surrogate)) == (400, "1214")
    assert error_of(client.post("/", json={"history": []})) == (400, "1213")


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {
        "status": "ok",
        "model": {"name": "scripted-1b", "loaded": True},
        "database": True,
    }
    client.post(CHAT, json=chat_body())
    text = client.get("/metrics").text
    assert 'glmstack_http_requests_total{method="POST",route="/chat/completions",status="200"} 1.0' in text
    assert 'glmstack_tokens_total{kind="completion",model="scripted-1b"} 3.0' in text
    assert "glmstack_engine_kv_blocks_in_use 0.0" in text and "glmstack_requests_in_flight 0.0" in text


def test_request_log_lines(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="glmstack.api.access"):
        response = client.post(CHAT, json=chat_body())
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmstack.api.access"]
    assert line["request_id"] == response.headers["x-request-id"] == response.json()["id"]
    assert (line["status"], line["route"], line["finish_reason"], line["completion_tokens"]) == (
        200,
        "/chat/completions",
        "stop",
        3,
    )
    assert line["key_id"] is not None
