"""Bad input at the real server, on SQLite and PostgreSQL (issue 7, test 6 and the request bounds): every field
out of range, negative, NaN or of the wrong type; huge strings, deep JSON, huge headers, odd Host headers;
every route without credentials; every broken JWT and key. Each answer is a 4xx in the documented envelope
with the documented code, naming the field where there is one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from platform_server import API_MAX_TOKENS, CHAT, Server

from glmstack.api import create_app
from glmstack.api.auth import PUBLIC_PATHS
from glmstack.api.docs_page import ASSET_FILES, ASSET_PREFIX
from glmstack.api.web_page import ASSET_PREFIX as WEB_PREFIX
from glmstack.protocol import ModelInfo
from glmstack.settings import Settings
from glmstack.store import Store

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

DROP = object()  # a field left out
MODELS = "/api/paas/v4/models"


def deep(levels: int, leaf: Any = 1) -> Any:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


def chat(**changes: Any) -> dict[str, Any]:
    body = {"model": "glm-4", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not DROP}


def message(**changes: Any) -> dict[str, Any]:
    return chat(
        messages=[{k: v for k, v in {"role": "user", "content": "hi", **changes}.items() if v is not DROP}]
    )


def tool(**function: Any) -> dict[str, Any]:
    function = {k: v for k, v in {"name": "f", **function}.items() if v is not DROP}
    return chat(tools=[{"type": "function", "function": function}])


NAN, INF = float("nan"), float("inf")
WRONG_NUMBERS = [-0.1, 1.01, NAN, INF, -INF, "hot", [0.5], {"v": 0.5}]

# (body, code, field): code 1210 is about the body as a whole; 1213/1214 name the field in their message.
CHAT_CASES: list[tuple[Any, str, str | None]] = [
    (chat(model=DROP), "1213", "model"),
    (chat(model=5), "1214", "model"),
    (chat(model="m" * 129), "1214", "model"),
    (chat(model="gpt-x"), "1211", None),
    (chat(messages=DROP), "1213", "messages"),
    (chat(messages=[]), "1214", "messages"),
    (chat(messages="hi"), "1214", "messages"),
    (chat(messages=[5]), "1214", "messages[0]"),
    (chat(messages=[{"role": "user", "content": "hi"}] * 257), "1214", "messages"),
    (message(role="robot"), "1214", "messages[0].role"),
    (message(role=DROP), "1213", "messages[0].role"),
    (message(content=5), "1214", "messages[0].content"),
    (message(content=DROP), "1213", "messages[0].content"),
    (message(content=[{"type": "image_url", "image_url": {"url": "x"}}]), "1214", "messages[0].content"),
    (message(role="assistant", tool_calls=[{}] * 129), "1214", "messages[0].tool_calls"),
    (message(role="assistant", tool_calls=[{"f": deep(40)}]), "1214", "messages[0].tool_calls[0]"),
    (message(role="tool", tool_call_id="c" * 129), "1214", "messages[0].tool_call_id"),
    (message(content="lone \ud800 surrogate"), "1214", "messages[0].content"),
    (message(content=[{"type": "text", "text": "\udfff"}]), "1214", "messages[0].content"),
    (chat(request_id="\ud800"), "1214", "request_id"),
    (
        chat(tools=[{"type": "function", "function": {"name": "f", "description": "\ud800"}}]),
        "1214",
        "tools[0]",
    ),
    (chat(request_id="r" * 129), "1214", "request_id"),
    (chat(request_id=5), "1214", "request_id"),
    *[(chat(do_sample=v), "1214", "do_sample") for v in ("maybe", 2, [])],
    *[(chat(stream=v), "1214", "stream") for v in ("maybe", 2, {})],
    *[(chat(temperature=v), "1214", "temperature") for v in WRONG_NUMBERS],
    *[(chat(top_p=v), "1214", "top_p") for v in WRONG_NUMBERS],
    *[
        (chat(max_tokens=v), "1214", "max_tokens")
        for v in (0, -1, 1.5, "many", NAN, 10**30, API_MAX_TOKENS + 1)
    ],
    *[(chat(stop=v), "1214", "stop") for v in (5, [""], ["x" * 257], ["a"] * 17, [5], {"s": 1})],
    *[(chat(seed=v), "1214", "seed") for v in (2**64, -(2**63) - 1, 1.5, "x", NAN)],
    *[(chat(user_id=v), "1214", "user_id") for v in ("abc", "u" * 129, 5)],
    *[(chat(user=v), "1214", "user") for v in ("u" * 129, 5)],
    *[(chat(n=v), "1214", "n") for v in (0, 2, "x")],
    (chat(tools="x"), "1214", "tools"),
    (chat(tools=[5]), "1214", "tools[0]"),
    (chat(tools=[{"type": "function"}]), "1214", "tools[0]"),
    (chat(tools=[{"type": ""}]), "1214", "tools[0].type"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}] * 129), "1214", "tools"),
    (chat(tools=[{"type": "retrieval", "retrieval": deep(40)}]), "1214", "tools[0]"),
    (tool(name="has space"), "1214", "tools[0].function.name"),
    (tool(name="n" * 65), "1214", "tools[0].function.name"),
    (tool(name=DROP), "1213", "tools[0].function.name"),
    (tool(parameters="string"), "1214", "tools[0].function.parameters"),
    (tool(parameters={"type": "string"}), "1214", "tools[0].function"),
    (tool(parameters={"type": "object", "properties": [1]}), "1214", "tools[0].function"),
    (tool(parameters={"type": "object", "properties": {"a": deep(40)}}), "1214", "tools[0]"),
    *[(chat(tool_choice=v), "1214", "tool_choice") for v in ("x" * 65, {"f": deep(40)}, 5)],
    ([1, 2], "1210", None),
    ("text", "1210", None),
    (5, "1210", None),
]

CLASSIC_CASES: list[tuple[Any, str, str | None]] = [
    ({}, "1213", "prompt"),
    ({"prompt": 5}, "1214", "prompt"),
    ({"prompt": "hi", "history": "x"}, "1214", "history"),
    ({"prompt": "hi", "history": [[1, 2]]}, "1214", "history"),
    ({"prompt": "\ud800"}, "1214", "prompt"),
    ({"prompt": "hi", "history": [["\ud800", "a"]]}, "1214", "history"),
    ({"prompt": "hi", "history": [["q", "a"]] * 200}, "1214", "history"),
    *[({"prompt": "hi", "max_length": v}, "1214", "max_length") for v in (0, -5, "x", 1.5, NAN)],
    *[({"prompt": "hi", "temperature": v}, "1214", "temperature") for v in WRONG_NUMBERS],
    *[({"prompt": "hi", "top_p": v}, "1214", "top_p") for v in WRONG_NUMBERS],
]


def envelope(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) <= {"error", "contentFilter"} and set(body["error"]) == {"code", "message"}, body
    return response.status_code, body["error"]["code"], body["error"]["message"]


def post_json(server: Server, path: str, body: Any, **headers: str) -> httpx.Response:
    # json.dumps writes NaN and Infinity as the bare words, as a sloppy client would
    content = json.dumps(body).encode()
    headers = {**server.auth, "Content-Type": "application/json", **headers}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=60)


def test_every_field_is_bounded(api_server: Server) -> None:
    cases = [(CHAT, *c) for c in CHAT_CASES] + [("/", *c) for c in CLASSIC_CASES]
    wrong = []
    for path, body, code, field in cases:
        status, got, text = envelope(post_json(api_server, path, body))
        named = field is None or f"{field}参数" in text
        if (status, got) != (400, code) or not named:
            wrong.append((path, json.dumps(body)[:120], (status, got, text[:160]), (code, field)))
    assert wrong == [], "\n".join(map(str, wrong))
    # Values at the bounds pass
    assert post_json(api_server, CHAT, chat(max_tokens=API_MAX_TOKENS, seed=2**63 - 1)).status_code == 200
    fine = tool(
        parameters={"type": "object", "properties": {"a": {"type": "string"}}}, description="x" * 10_000
    )
    assert post_json(api_server, CHAT, fine).status_code == 200
    assert post_json(api_server, "/", {"prompt": "hi", "max_length": 10**30}).status_code == 200
    # The smallest positive values sample (clamped as the SDKs do) rather than divide the logits into NaN
    for path, body in (
        (CHAT, chat(temperature=5e-324, top_p=5e-324)),
        ("/", {"prompt": "hi", "temperature": 1e-300}),
    ):
        assert post_json(api_server, path, body).status_code == 200


def test_huge_and_hostile_bodies(api_server: Server) -> None:
    # 10 MB announced: refused from the Content-Length, before the body is read
    head = [f"POST {CHAT} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {api_server.key}"]
    status, body = raw_exchange(api_server, [*head, "Content-Length: 10000000"], b"x" * 65536)
    assert (status, error_code(body)) == (413, "1210")
    for text in ("[" * 10_000 + "]" * 10_000, '{"model": ', "\x00\xff", "[" * 100_000):
        response = httpx.post(
            api_server.url + CHAT, content=text.encode(), headers=api_server.auth, timeout=60
        )
        assert envelope(response)[:2] == (400, "1210"), text[:20]
    digits = '{"model": "glm-4", "messages": [], "max_tokens": ' + "9" * 5000 + "}"
    response = httpx.post(api_server.url + CHAT, content=digits.encode(), headers=api_server.auth, timeout=60)
    assert envelope(response)[:2] == (400, "1210")
    # Odd but valid strings reach the model and come back as ordinary answers
    for content in ("\x00", "\u202e right-to-left", "🐉" * 100, "\ufeff\u200b"):
        response = post_json(api_server, CHAT, chat(messages=[{"role": "user", "content": content}]))
        assert response.status_code < 500 and response.json(), (content[:10], response.text[:200])


# ---- the request head -------------------------------------------------------------------------------------


def raw_exchange(server: Server, head: list[str], body: bytes = b"") -> tuple[int, bytes]:
    """Sends a request head exactly as given (plus Connection: close) and `body`; returns the status and the
    response body."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join([*head, "Connection: close", "", ""])).encode("latin-1") + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in headers.lower():
        decoded = b""
        while body:
            size, _, body = body.partition(b"\r\n")
            decoded, body = decoded + body[: int(size, 16)], body[int(size, 16) + 2 :]
        body = decoded
    return int(status_line.split()[1]), body


def error_code(body: bytes) -> str:
    payload = json.loads(body)
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}, payload
    return payload["error"]["code"]


def test_header_size_and_host(api_server: Server) -> None:
    auth = f"Authorization: Bearer {api_server.key}"
    host = api_server.url.removeprefix("http://")
    assert raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", f"Host: {host}", auth])[0] == 200
    big = "X-Padding: " + "a" * 100_000
    status, body = raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", f"Host: {host}", auth, big])
    assert (status, error_code(body)) == (400, "1210")
    many = [f"X-H{i}: {'b' * 60}" for i in range(2000)]
    status, body = raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", f"Host: {host}", auth, *many])
    assert (status, error_code(body)) == (400, "1210")
    fits = "X-Padding: " + "a" * 8_000
    assert raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", f"Host: {host}", auth, fits])[0] == 200
    for bad in ("evil.example/health", "a?b=1", "a#b", "user@host", "host:80/x", "a b"):
        for path in (MODELS, "/health", "/metrics"):
            status, body = raw_exchange(api_server, [f"GET {path} HTTP/1.1", f"Host: {bad}", auth])
            assert status == 400 and error_code(body) in ("1210", "1214"), (bad, path, body)
    status, body = raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", "Host: a", "Host: b", auth])
    assert status == 400 and error_code(body) in ("1210", "1214")
    for good in ("[::1]:8000", "localhost", "glm.example.com:443", "127.0.0.1"):
        assert raw_exchange(api_server, [f"GET {MODELS} HTTP/1.1", f"Host: {good}", auth])[0] == 200
    # Nothing a request says about where it came from opens anything
    spoofed = [f"GET {MODELS} HTTP/1.1", "Host: localhost", "X-Forwarded-For: 127.0.0.1", "X-Real-IP: ::1"]
    status, body = raw_exchange(api_server, spoofed)
    assert (status, error_code(body)) == (401, "1001")


# ---- credentials ------------------------------------------------------------------------------------------


class _Engine:
    def info(self) -> ModelInfo:
        return ModelInfo("enumerating", "None", 1024, "cpu", "float32")

    def stats(self) -> dict[str, int]:
        return {}


# the API's description: the page, its Swagger UI files (served by glmstack: docs_page) and the document
ALLOWED = PUBLIC_PATHS | {"/docs", "/docs/oauth2-redirect", "/openapi.json"} | {
    f"{ASSET_PREFIX}/{name}" for name in ASSET_FILES}


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, read from the app itself, so that a route added later
    is checked without anyone listing it here."""
    nothing_stored = SimpleNamespace(usage=None, dialect="sqlite")  # only the routes are read
    app = create_app(Settings(home=Path("/nonexistent"), database_url="unused"), _Engine(), nothing_stored)
    found, pending = [], list(app.routes)
    while pending:
        route = pending.pop()
        if hasattr(route, "effective_candidates"):  # an included router: its routes, prefix applied
            pending += route.effective_candidates()
            continue
        methods = getattr(getattr(route, "original_route", route), "methods", None) or ()
        found += [(method, route.path) for method in sorted(methods) if method != "HEAD"]
    assert {("POST", CHAT), ("POST", "/v1/chat/completions"), ("GET", "/metrics")} <= set(found), found
    return found


# The chat page (api/web_page.py): open like /docs - it holds no data, and the API calls it makes carry the key.
# By method: `POST /` is ChatGLM's classic endpoint, keyed like the API.
OPEN_PAGES = {("GET", "/"): "/", ("GET", f"{WEB_PREFIX}/{{path:path}}"): f"{WEB_PREFIX}/app.js"}


def test_every_route_outside_the_allow_list_needs_credentials(api_server: Server) -> None:
    for method, path in app_routes():
        if (method, path) in OPEN_PAGES:
            page = httpx.request(method, api_server.url + OPEN_PAGES[method, path], timeout=30)
            assert page.status_code == 200 and page.content, (method, path)
            continue
        url = api_server.url + re.sub(r"\{[^}]+\}", "glm-4", path)
        anonymous = httpx.request(method, url, json={}, timeout=30)
        if path in ALLOWED:
            assert anonymous.status_code == 200, (method, path, anonymous.text[:200])
            continue
        assert envelope(anonymous)[:2] == (401, "1001"), (method, path)
        wrong = httpx.request(method, url, json={}, headers={"Authorization": "nobody.wrong"}, timeout=30)
        assert envelope(wrong)[:2] == (401, "1000"), (method, path)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(
    payload: dict[str, Any], secret: str, header: dict[str, Any] | None = None, digest=hashlib.sha256
) -> str:
    header = {"alg": "HS256", "sign_type": "SIGN"} if header is None else header
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


NONE_HEADER = b64url(b'{"alg":"none","sign_type":"SIGN"}')


def test_jwt_and_key_cases(api_server: Server) -> None:
    home, url = api_server.home, api_server.database_url
    with Store(url, home=home) as store:
        revoked_key = store.keys.create("to revoke")[1]
        store.keys.revoke(revoked_key.split(".")[0])
    key_id, secret = api_server.key.split(".")
    gone_id, gone_secret = revoked_key.split(".")
    now = time.time_ns() // 1_000_000

    def token(**changes: Any) -> str:
        payload = {"api_key": key_id, "exp": now + 60_000, "timestamp": now, **changes}
        return jwt({k: v for k, v in payload.items() if v is not DROP}, secret)

    unsigned = token().rsplit(".", 1)[0]
    cases = [
        (token(), 200),
        (api_server.key, 200),
        (jwt({"api_key": key_id, "exp": now + 60_000}, secret, {"alg": "none", "sign_type": "SIGN"}), "1002"),
        (f"{NONE_HEADER}.{unsigned.split('.')[1]}.", "1002"),
        (
            jwt(
                {"api_key": key_id, "exp": now + 60_000},
                secret,
                {"alg": "HS512", "sign_type": "SIGN"},
                hashlib.sha512,
            ),
            "1002",
        ),
        (jwt({"api_key": key_id, "exp": now + 60_000}, secret, {"alg": "HS256"}), "1002"),
        (token(exp=DROP), "1002"),
        (token(exp=now // 1000 + 3600), "1003"),  # seconds: long past, read as milliseconds
        (token(exp=now - 1), "1003"),
        (token(exp=str(now + 60_000)), "1002"),
        (token(exp=now + 60_000.5), "1002"),
        (token(exp=now + 25 * 3600 * 1000), "1002"),  # lifetime beyond 24 h
        (token(timestamp=now + 10 * 60 * 1000), "1002"),
        (jwt({"api_key": key_id, "exp": now + 60_000}, "not-the-secret"), "1004"),
        (token(api_key="Unknown0Key0Id00"), "1004"),
        (token(api_key="ab\x00cd"), "1004"),
        (token(api_key="../../etc/passwd"), "1004"),
        (token(api_key=5), "1002"),
        (jwt({"api_key": gone_id, "exp": now + 60_000}, gone_secret), "1004"),
        (unsigned + ".!!!", "1002"),
        ("a.b.c", "1002"),
        ("", "1002"),  # "Bearer" and nothing after it
        (f"{key_id}.wrong-secret", "1000"),
        ("Unknown0Key0Id00.secret", "1000"),
        (revoked_key, "1000"),
        ("no-dot-at-all", "1002"),
        ("a.b.c.d", "1002"),
        ("x" * 5000, "1002"),
        ("Basic dXNlcjpwYXNz", "1002"),
        ("ключ.секрет".encode().decode("latin-1"), "1000"),
    ]
    wrong = []
    for credential, expected in cases:
        headers = {"Authorization": f"Bearer {credential}".strip().encode("latin-1")}
        response = httpx.get(api_server.url + MODELS, headers=headers, timeout=30)
        got = 200 if response.status_code == 200 else envelope(response)[1]
        if got != expected or (expected != 200 and response.status_code != 401):
            wrong.append((credential[:60], expected, response.status_code, response.text[:160]))
    assert wrong == [], "\n".join(map(str, wrong))
