"""Who may call, how much at once, how large, and what content: auth (keys, JWT, open mode, deny by default),
per-key and global concurrency, the body size limit, and content safety — in-process, on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from scripted import CHAT, ScriptedEngine, chat_body, client_ok, error_of, sse_events, written_usage

from glmstack.api.auth import PUBLIC_PATHS, KeyedRoute
from glmstack.store import Store


def test_body_size_limit(make_client, key: str) -> None:
    c = make_client(max_body_bytes=2000)
    c.headers["Authorization"] = key
    assert error_of(c.post(CHAT, json=chat_body(messages=[{"role": "user", "content": "x" * 3000}]))) == (
        413,
        "1210",
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while the body streams in
        yield b'{"model": "glm-4", "messages": [{"role": "user", "content": "'
        yield b"x" * 3000
        yield b'"}]}'

    assert error_of(c.post(CHAT, content=chunks(), headers={"content-type": "application/json"})) == (
        413,
        "1210",
    )
    assert client_ok(c, chat_body())


# ---- auth -------------------------------------------------------------------------------------------------


def test_credentials(make_client, store: Store, key: str) -> None:
    c = make_client()
    key_id, secret = key.split(".")
    assert error_of(c.post(CHAT, json=chat_body())) == (401, "1001")
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key_id}.wrong"})) == (
        401,
        "1000",
    )
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer nonsense"})) == (
        401,
        "1002",
    )
    assert c.post(CHAT, json=chat_body(), headers={"Authorization": key}).status_code == 200  # no Bearer
    store.keys.create("another")  # so that revoking the first does not leave the server keyless (open)
    store.keys.revoke(key_id)
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})) == (
        401,
        "1000",
    )


def test_jwt(make_client, key: str) -> None:
    import jwt  # the official SDK's signer

    c = make_client()
    key_id, secret = key.split(".")

    def token(exp_offset_ms: int, signing_secret: str = secret) -> str:
        now = __import__("time").time_ns() // 1_000_000
        return jwt.encode(
            {"api_key": key_id, "exp": now + exp_offset_ms, "timestamp": now},
            signing_secret,
            algorithm="HS256",
            headers={"alg": "HS256", "sign_type": "SIGN"},
        )

    assert (
        c.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {token(210_000)}"}).status_code
        == 200
    )
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": token(-1)})) == (401, "1003")
    assert error_of(c.post(CHAT, json=chat_body(), headers={"Authorization": token(10_000, "x")})) == (
        401,
        "1004",
    )


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
    assert (
        local.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer anything.at-all"}).status_code
        == 200
    )
    exposed = make_client(host="0.0.0.0")
    assert error_of(exposed.post(CHAT, json=chat_body())) == (401, "1001")
    # Once a key exists, the local server asks for it too
    store.keys.create("first")
    assert error_of(local.post(CHAT, json=chat_body())) == (401, "1001")
    [row] = written_usage(store, local)
    assert row.key_id is None and row.requests == 1 + 1


# ---- concurrency ------------------------------------------------------------------------------------------


# Every wait below ends by then, or fails the test saying what it was waiting for.
DEADLINE_S = 30.0


async def _until(condition: Callable[[], bool], what: str, *watched: asyncio.Task) -> None:
    """Polls `condition` until it holds. Fails after DEADLINE_S, or at once when a watched request has
    already ended (it can no longer bring the condition about)."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        for task in watched:
            if task.done():
                response = task.result()
                pytest.fail(
                    f"waiting for {what}: a request ended first: {response.status_code} {response.text}"
                )
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: not reached within {DEADLINE_S:g} s")
        await asyncio.sleep(0.01)


async def _settled(task: asyncio.Task, what: str) -> httpx.Response:
    """The task's response, within DEADLINE_S."""
    try:
        return await asyncio.wait_for(task, DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"{what}: no response within {DEADLINE_S:g} s")


async def _held_then_refused(
    app: Any,
    engine: ScriptedEngine,
    headers: dict[str, str],
    second: dict[str, str],
) -> tuple[int, str, list[int]]:
    """A request held in the engine, a second one refused meanwhile; returns the refusal's status and
    code, and the statuses of the held request and of a second one sent after it ended."""
    engine.gate = asyncio.Event()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
        first = asyncio.create_task(c.post(CHAT, json=chat_body(), headers=headers))
        await _until(lambda: engine.active == 1, "the first request to reach the engine", first)
        refused = await c.post(CHAT, json=chat_body(), headers=second)
        engine.gate.set()
        done = await _settled(first, "the held request, once released")
        after = await c.post(CHAT, json=chat_body(), headers=second)
    return *error_of(refused), [done.status_code, after.status_code]


def test_per_key_concurrency(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, limited = store.keys.create("one at a time", concurrency_limit=1)
    headers = {"Authorization": limited}
    assert asyncio.run(_held_then_refused(make_client().app, engine, headers, headers)) == (
        429,
        "1302",
        [200, 200],
    )


def test_other_keys_are_not_limited(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, limited = store.keys.create("one at a time", concurrency_limit=1)
    _, other = store.keys.create("someone else")
    app = make_client().app

    async def run() -> list[int]:
        engine.gate = asyncio.Event()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            first = asyncio.create_task(c.post(CHAT, json=chat_body(), headers={"Authorization": limited}))
            await _until(lambda: engine.active == 1, "the limited key's request to reach the engine", first)
            second = asyncio.create_task(c.post(CHAT, json=chat_body(), headers={"Authorization": other}))
            await _until(
                lambda: engine.active == 2, "the other key's request to reach the engine", first, second
            )
            engine.gate.set()
            return [
                (await _settled(first, "the limited key's request")).status_code,
                (await _settled(second, "the other key's request")).status_code,
            ]

    assert asyncio.run(run()) == [200, 200]


def test_global_bound(make_client, store: Store, engine: ScriptedEngine) -> None:
    _, a = store.keys.create("a")
    _, b = store.keys.create("b")
    app = make_client(max_queue=1).app
    assert asyncio.run(_held_then_refused(app, engine, {"Authorization": a}, {"Authorization": b})) == (
        429,
        "1305",
        [200, 200],
    )


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
        response = strict_client.post(
            CHAT, json=chat_body(messages=[{"role": "user", "content": text}], stream=stream)
        )
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
    assert written_usage(store, strict_client)[0].completion_tokens == 3


def test_sensitive_output_sync_is_refused(strict_client: TestClient) -> None:
    response = strict_client.post(CHAT, json=chat_body())
    assert error_of(response) == (400, "1301")
    assert response.json()["contentFilter"] == [{"level": 1, "role": "assistant"}]
    assert "Hello" not in response.text
