"""The HTTP service in-process, against a scripted engine and a real store (SQLite and PostgreSQL): every
error path answers with the documented envelope, limits and safety hold, usage is recorded.

The real model, real server and official SDKs are in tests/test_api_server.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from glmstack.api import create_app
from glmstack.api.auth import PUBLIC_PATHS, KeyedRoute
from glmstack.protocol import (
    EngineOverloadedError,
    GenerateRequest,
    GenerationEvent,
    ModelInfo,
    PromptTooLongError,
    Usage,
)
from glmstack.settings import Settings
from glmstack.store import Store

CHAT = "/api/paas/v4/chat/completions"


class ScriptedEngine:
    """Replies with `reply`, word by word; `gate` (an asyncio.Event) holds every generation until set."""

    def __init__(self) -> None:
        self.reply = ["Hello", " there", "!"]
        self.finish = "stop"
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.requests: list[GenerateRequest] = []
        self.active = 0

    def info(self) -> ModelInfo:
        return ModelInfo("scripted-1b", "Scripted", 4096, "cpu", "float32")

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(len(m["content"].split()) for m in messages) + 3

    def stats(self) -> dict[str, int]:
        return {"waiting": 0, "running": self.active, "kv_blocks_in_use": 2 * self.active}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        self.active += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            usage = Usage(prompt_tokens=self.count_prompt_tokens(request.messages or []))
            for word in self.reply:
                usage.completion_tokens += 1
                yield GenerationEvent(word, [1], usage=usage, time_to_first_token=0.01)
            yield GenerationEvent("", [], finish_reason=self.finish, usage=usage)
        finally:
            self.active -= 1

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    with Store(database_url, home=tmp_path) as s:
        yield s


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def make_client(store: Store, engine: ScriptedEngine, tmp_path: Path):
    def make(**overrides: Any) -> TestClient:
        settings = Settings(home=tmp_path, database_url="unused", **overrides)
        return TestClient(create_app(settings, engine, store), raise_server_exceptions=False)
    return make


@pytest.fixture
def key(store: Store) -> str:
    return store.keys.create("tests")[1]


@pytest.fixture
def client(make_client, key: str) -> TestClient:
    c = make_client()
    c.headers["Authorization"] = f"Bearer {key}"
    return c


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    return response.status_code, body["error"]["code"]


# ---- the happy paths --------------------------------------------------------------------------------------


def test_sync_completion(client: TestClient, store: Store, engine: ScriptedEngine) -> None:
    body = chat_body(request_id="my-request-1", temperature=0.5, top_p=0.9, max_tokens=20, stop="END",
                     do_sample=True, seed=7, user_id="end-user-42")
    response = client.post(CHAT, json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["request_id"] == "my-request-1" and data["id"] == response.headers["x-request-id"]
    assert data["model"] == "glm-4" and data["object"] == "chat.completion"
    assert data["choices"] == [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "Hello there!"}}]
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    params = engine.requests[-1].params
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (0.5, 0.9, 20, ["END"], 7)
    [row] = store.usage.report()
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
    body = chat_body(response_format=None, thinking=None, sensitive_word_check={"type": "ALL", "status": "ENABLE"},
                     meta=None, extra=None, watermark_enabled=None, tools=None, tool_choice=None, stop=None,
                     stream=None, stream_options={"include_usage": True}, n=1, user="u", something_new=[1])
    assert client.post(CHAT, json=body).status_code == 200


def test_message_kinds(client: TestClient, engine: ScriptedEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What's the "}, {"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None, "reasoning_content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "index": 0,
                         "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert client.post(CHAT, json=chat_body(messages=messages, tools=tools, tool_choice="auto")).status_code == 200
    sent = engine.requests[-1]
    assert sent.tools == tools
    assert sent.messages[1] == {"role": "user", "content": "What's the weather?"}
    assert sent.messages[2]["tool_calls"][0]["id"] == "call_1" and sent.messages[2]["content"] == ""
    assert sent.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


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


def test_models(client: TestClient) -> None:
    for prefix in ("/api/paas/v4", "/v1"):
        listing = client.get(f"{prefix}/models").json()
        ids = [m["id"] for m in listing["data"]]
        assert listing["object"] == "list" and ids[0] == "scripted-1b" and "glm-4" in ids
        assert all(m["root"] == "scripted-1b" for m in listing["data"])
    assert client.get("/v1/models/GLM-4-Flash").json()["id"] == "GLM-4-Flash"
    assert error_of(client.get("/v1/models/gpt-4")) == (404, "1211")


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "expected", "field"), [
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
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     (400, "1214"), "messages[0].content"),
    (chat_body(stop=[""]), (400, "1214"), "stop"),
    (chat_body(user_id="abc"), (400, "1214"), "user_id"),
    (chat_body(n=2), (400, "1214"), "n"),
    ([1, 2], (400, "1210"), None),
])
def test_invalid_requests(client: TestClient, body: Any, expected: tuple[int, str], field: str | None) -> None:
    response = client.post(CHAT, json=body)
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


def client_ok(c: TestClient, body: dict[str, Any]) -> bool:
    return c.post(CHAT, json=body).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusals(client: TestClient, engine: ScriptedEngine, stream: bool) -> None:
    engine.error = PromptTooLongError("prompt is 9000 tokens; the context is 4096")
    response = client.post(CHAT, json=chat_body(stream=stream))
    assert error_of(response) == (400, "1261") and "9000" in response.json()["error"]["message"]
    engine.error = EngineOverloadedError("engine queue is full")
    assert error_of(client.post(CHAT, json=chat_body(stream=stream))) == (429, "1305")


def test_body_size_limit(make_client, key: str) -> None:
    c = make_client(max_body_bytes=2000)
    c.headers["Authorization"] = key
    assert error_of(c.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 3000}]))) == (413, "1210")

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while the body streams in
        yield b'{"model": "glm-4", "messages": [{"role": "user", "content": "'
        yield b"x" * 3000
        yield b'"}]}'

    assert error_of(c.post(CHAT, content=chunks(), headers={"content-type": "application/json"})) == (413, "1210")
    assert client_ok(c, chat_body())


# ---- auth -------------------------------------------------------------------------------------------------


def test_credentials(make_client, store: Store, key: str) -> None:
    c = make_client()
    key_id, secret = key.split(".")
    assert error_of(c.post(CHAT, json=chat_body())) == (401, "1001")
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key_id}.wrong"})) == (401, "1000")
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer nonsense"})) == (401, "1002")
    assert c.post(CHAT, json=chat_body(), headers={"Authorization": key}).status_code == 200  # no Bearer
    store.keys.create("another")  # so that revoking the first does not leave the server keyless (open)
    store.keys.revoke(key_id)
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})) == (401, "1000")


def test_jwt(make_client, key: str) -> None:
    import jwt  # the official SDK's signer

    c = make_client()
    key_id, secret = key.split(".")

    def token(exp_offset_ms: int, signing_secret: str = secret) -> str:
        now = __import__("time").time_ns() // 1_000_000
        return jwt.encode({"api_key": key_id, "exp": now + exp_offset_ms, "timestamp": now}, signing_secret,
                          algorithm="HS256", headers={"alg": "HS256", "sign_type": "SIGN"})

    assert c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {token(210_000)}"}).status_code == 200
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": token(-1)})) == (401, "1003")
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": token(10_000, "x")})) == (401, "1004")


def test_auth_comes_before_the_body_is_read(make_client, key: str) -> None:
    c = make_client()
    assert error_of(c.post(CHAT, content=b"{not json")) == (401, "1001")
    assert error_of(c.get("/api/paas/v4/models")) == (401, "1001")


def test_deny_by_default(make_client, key: str) -> None:
    c = make_client()
    routes: list[APIRoute] = []
    pending = list(c.app.routes)
    while pending:  # included routers nest their routes
        route = pending.pop()
        if isinstance(route, APIRoute):
            routes.append(route)
        pending += getattr(getattr(route, "original_router", None), "routes", [])
    assert routes and all(isinstance(r, KeyedRoute) for r in routes)
    assert {r.path for r in routes if r.path in PUBLIC_PATHS} == {"/health"}
    assert c.get("/health").status_code == 200
    assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
    assert error_of(c.get("/metrics")) == (401, "1001")
    assert c.get("/metrics", headers={"Authorization": key}).status_code == 200
    assert error_of(c.post("/", json={"prompt": "hi"})) == (401, "1001")


def test_open_only_on_loopback_without_keys(make_client, store: Store) -> None:
    local = make_client(host="127.0.0.1")
    assert local.post(CHAT, json=chat_body()).status_code == 200
    assert local.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer anything.at-all"}).status_code == 200
    exposed = make_client(host="0.0.0.0")
    assert error_of(exposed.post(CHAT, json=chat_body())) == (401, "1001")
    # Once a key exists, the local server asks for it too
    store.keys.create("first")
    assert error_of(local.post(CHAT, json=chat_body())) == (401, "1001")
    [row] = store.usage.report()
    assert row.key_id is None and row.requests == 1 + 1


# ---- concurrency ------------------------------------------------------------------------------------------


async def _held_then_refused(app: Any, engine: ScriptedEngine, headers: dict[str, str], second: dict[str, str],
                             ) -> tuple[int, str, int]:
    engine.gate = asyncio.Event()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        first = asyncio.create_task(c.post(CHAT, json=chat_body(), headers=headers))
        while engine.active == 0:
            await asyncio.sleep(0.01)
        refused = await c.post(CHAT, json=chat_body(), headers=second)
        engine.gate.set()
        done = await first
        after = await c.post(CHAT, json=chat_body(), headers=second)
    return refused.status_code, refused.json()["error"]["code"], done.status_code + after.status_code


def test_per_key_concurrency(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, limited = store.keys.create("one at a time", concurrency_limit=1)
    headers = {"Authorization": limited}
    assert asyncio.run(_held_then_refused(make_client().app, engine, headers, headers)) == (429, "1302", 400)


def test_other_keys_are_not_limited(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, limited = store.keys.create("one at a time", concurrency_limit=1)
    _, other = store.keys.create("someone else")
    app = make_client().app

    async def run() -> int:
        engine.gate = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post(CHAT, json=chat_body(), headers={"Authorization": limited}))
            while engine.active == 0:
                await asyncio.sleep(0.01)
            second = asyncio.create_task(c.post(CHAT, json=chat_body(), headers={"Authorization": other}))
            while engine.active < 2:
                await asyncio.sleep(0.01)
            engine.gate.set()
            return (await first).status_code + (await second).status_code

    assert asyncio.run(run()) == 400


def test_global_bound(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, a = store.keys.create("a")
    _, b = store.keys.create("b")
    app = make_client(max_queue=1).app
    assert asyncio.run(_held_then_refused(app, engine, {"Authorization": a}, {"Authorization": b})) == (
        429, "1305", 400)


# ---- content safety ---------------------------------------------------------------------------------------


@pytest.fixture
def strict_client(make_client, key: str, tmp_path: Path) -> TestClient:
    folder = tmp_path / "safety"
    folder.mkdir()
    (folder / "mine.txt").write_text("# test terms\nforbidden\n违禁词\nre:\\bthere!\n", encoding="utf-8")
    c = make_client(safety_dir=folder)
    c.headers["Authorization"] = key
    return c


@pytest.mark.parametrize("stream", [False, True])
def test_sensitive_input(strict_client: TestClient, engine: ScriptedEngine, stream: bool) -> None:
    for text in ("a FORBIDDEN word", "这是违禁词", "ｆｏｒｂｉｄｄｅｎ"):  # case, Chinese, full-width
        response = strict_client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": text}],
                                                           stream=stream))
        assert error_of(response) == (400, "1301")
        assert response.json()["contentFilter"] == [{"level": 1, "role": "user"}]
    assert engine.requests == []
    strict_client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "forbiddenness"}]))
    assert len(engine.requests) == 1  # whole words only for ASCII terms


def test_sensitive_output_ends_the_stream(strict_client: TestClient, store: Store) -> None:
    response = strict_client.post(CHAT, json=chat_body(stream=True))
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "sensitive"
    assert last["content_filter"] == [{"role": "assistant", "level": 1}]
    assert "there!" not in "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert last["usage"]["completion_tokens"] == 3
    assert store.usage.report()[0].completion_tokens == 3


def test_sensitive_output_sync_is_refused(strict_client: TestClient) -> None:
    response = strict_client.post(CHAT, json=chat_body())
    assert error_of(response) == (400, "1301")
    assert response.json()["contentFilter"] == [{"level": 1, "role": "assistant"}]
    assert "Hello" not in response.text


# ---- classic api.py, health, metrics ----------------------------------------------------------------------


def test_classic_endpoint(client: TestClient, engine: ScriptedEngine) -> None:
    data = client.post("/", json={"prompt": "hi", "history": [["hello", "hey"]], "max_length": 64,
                                  "top_p": 0.5, "temperature": 0.1}).json()
    assert data["response"] == "Hello there!" and data["status"] == 200
    assert data["history"] == [["hello", "hey"], ["hi", "Hello there!"]]
    assert len(data["time"]) == len("2024-01-01 12:00:00")
    request = engine.requests[-1]
    assert [m["role"] for m in request.messages] == ["user", "assistant", "user"]
    assert request.params.max_tokens == 64 - engine.count_prompt_tokens(request.messages)
    chatglm3 = client.post("/", json={"prompt": "hi", "history": [{"role": "user", "content": "a"},
                                                                   {"role": "assistant", "content": "b"}]}).json()
    assert chatglm3["history"][-2:] == [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "Hello there!"}]
    assert error_of(client.post("/", json={"prompt": "hi", "max_length": 3})) == (400, "1261")
    assert error_of(client.post("/", json={"prompt": "hi", "history": [1, 2]})) == (400, "1214")
    assert error_of(client.post("/", json={"history": []})) == (400, "1213")


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok", "model": {"name": "scripted-1b", "loaded": True},
                                            "database": True}
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
        200, "/chat/completions", "stop", 3)
    assert line["key_id"] is not None


def test_http_side_never_imports_torch() -> None:
    code = ("import sys, glmstack.api.app, glmstack.api.serve, glmstack.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
