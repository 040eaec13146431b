"""End to end: `glmstack serve` on the bundled model, driven by the official SDKs (zhipuai, zai-sdk, openai)
and by raw httpx for the wire details and every error path. The server is started once per module and
database (SQLite, then PostgreSQL when GLMSTACK_TEST_POSTGRES_URL is set); replies are kept a few tokens long.

The server's safety list is the test's own: "Paris" (so a question about France trips the output check)
and "forbiddenword" (the input check)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import openai
import pytest
import zhipuai
from servers import launch_serve, postgres_schema
from zai import ZhipuAiClient

from glmstack.store import Store

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Say hi."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Greedy decoding of this runs to any max_tokens we use on the bundled model: a request that stays busy.
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Like conftest's `database_url`, but one database per module, for a server that outlives a test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'glmstack.db'}"
        return
    with postgres_schema() as url:
        yield url


@dataclass
class Server:
    url: str
    key: str  # "id.secret"
    limited_key: str  # concurrency_limit=1
    store: Store

    @property
    def v4(self) -> str:
        return f"{self.url}/api/paas/v4"

    def post(
        self, body: dict, key: str | None = None, path: str = "/api/paas/v4/chat/completions", **kwargs
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers, **{"timeout": 120, **kwargs})

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": self.key}).text
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no generation is admitted or known to the engine."""
        deadline = time.monotonic() + timeout
        names = ("glmstack_requests_in_flight", "glmstack_engine_running", "glmstack_engine_waiting")
        while any(self.metric(n) for n in names):
            assert time.monotonic() < deadline, {n: self.metric(n) for n in names}
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(server_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("home")
    safety = home / "safety"
    safety.mkdir()
    (safety / "terms.txt").write_text("Paris\nforbiddenword\n", encoding="utf-8")
    store = Store(server_database_url, home=home)
    _, key = store.keys.create("e2e")
    _, limited = store.keys.create("one at a time", concurrency_limit=1)
    env = {
        **os.environ,
        "GLMSTACK_HOME": str(home),
        "GLMSTACK_DATABASE_URL": server_database_url,
        "GLMSTACK_SAFETY_DIR": str(safety),
        "GLMSTACK_MAX_BODY_BYTES": "65536",
        "GLMSTACK_LOG_LEVEL": "INFO",
    }
    proc, url = launch_serve(["--port", "0", "--device", "cpu"], env, home / "server.log")
    try:
        yield Server(url, key, limited, store)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        store.close()


# ---- official SDKs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("jwt_mode", [False, True], ids=["raw-key", "jwt"])
@pytest.mark.parametrize("sdk", ["zhipuai", "zai"])
def test_zhipu_sdks(server: Server, sdk: str, jwt_mode: bool) -> None:
    make = zhipuai.ZhipuAI if sdk == "zhipuai" else ZhipuAiClient
    client = make(api_key=server.key, base_url=server.v4, disable_token_cache=not jwt_mode)
    reply = client.chat.completions.create(model="glm-4", messages=HI, max_tokens=6, request_id=f"req-{sdk}")
    assert reply.request_id == f"req-{sdk}" and reply.model == "glm-4"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model="glm-4", messages=HI, max_tokens=6, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].delta.content for c in chunks)
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in chunks[:-1])
    assert (
        chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens <= 6
    )


@pytest.mark.parametrize("prefix", ["/v1", "/api/paas/v4/"])
def test_openai_sdk(server: Server, prefix: str) -> None:
    client = openai.OpenAI(api_key=server.key, base_url=server.url + prefix)
    reply = client.chat.completions.create(model="glm-4", messages=HI, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="glm-4", messages=HI, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream)
    # The stream helper only accepts chunks whose object is "chat.completion.chunk" (sdk-wire §4)
    with client.chat.completions.stream(model="glm-4", messages=HI, max_tokens=6) as helper:
        assert "".join(e.delta for e in helper if e.type == "content.delta")
    assert "glm-4" in [m.id for m in client.models.list()]


def test_sdk_errors(server: Server) -> None:
    bad = zhipuai.ZhipuAI(api_key="nobody.wrong", base_url=server.v4)
    with pytest.raises(zhipuai.APIAuthenticationError) as caught:
        bad.chat.completions.create(model="glm-4", messages=HI)
    assert caught.value.response.json()["error"]["code"] == "1000"
    good = zhipuai.ZhipuAI(api_key=server.key, base_url=server.v4)
    with pytest.raises(zhipuai.APIRequestFailedError) as caught:
        good.chat.completions.create(model="not-a-model", messages=HI)
    assert '"1211"' in str(caught.value)  # the SDK's only view of the business code is the body text
    with pytest.raises(openai.AuthenticationError) as oai:
        openai.OpenAI(api_key="nobody.wrong", base_url=f"{server.url}/v1").models.list()
    assert oai.value.code == "1000"
    with pytest.raises(openai.BadRequestError) as oai:
        openai.OpenAI(api_key=server.key, base_url=f"{server.url}/v1").chat.completions.create(
            model="glm-4", messages=HI, temperature=1.7
        )
    assert oai.value.code == "1214" and "temperature" in oai.value.message


# ---- the wire, raw ----------------------------------------------------------------------------------------


def test_sse_framing(server: Server) -> None:
    with httpx.stream(
        "POST",
        f"{server.v4}/chat/completions",
        headers={"Authorization": server.key},
        json={"model": "glm-4", "messages": HI, "max_tokens": 6, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(response.iter_raw()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and all(c["created"] > 0 for c in chunks)
    assert [("usage" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_error_paths(server: Server) -> None:
    key_id, secret = server.key.split(".")
    now = time.time_ns() // 1_000_000

    def token(exp: int, signing: str = secret) -> str:
        return jwt.encode(
            {"api_key": key_id, "exp": exp, "timestamp": now},
            signing,
            algorithm="HS256",
            headers={"alg": "HS256", "sign_type": "SIGN"},
        )

    body = {"model": "glm-4", "messages": HI, "max_tokens": 2}
    cases = [
        (server.post(body, key=f"{key_id}.not-the-secret"), 401, "1000"),
        (httpx.post(f"{server.v4}/chat/completions", json=body), 401, "1001"),
        (server.post(body, key=token(now - 1000)), 401, "1003"),
        (server.post(body, key=token(now + 60_000, "forged")), 401, "1004"),
        (server.post({**body, "model": "gpt-4o"}), 400, "1211"),
        (server.post({**body, "top_p": 3}), 400, "1214"),
        (server.post({**body, "messages": [{"role": "user", "content": "x" * 70_000}]}), 413, "1210"),
        (server.post({**body, "messages": [{"role": "user", "content": "say forbiddenword"}]}), 400, "1301"),
        (
            server.post({**body, "stream": True, "messages": [{"role": "user", "content": "forbiddenword"}]}),
            400,
            "1301",
        ),
        (httpx.get(f"{server.url}/api/paas/v4/nothing", headers={"Authorization": server.key}), 404, "1222"),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert server.post(body, key=token(now + 60_000)).status_code == 200


def test_sensitive_output(server: Server) -> None:
    body = {"model": "glm-4", "messages": FRANCE, "max_tokens": 16, "do_sample": False}
    refused = server.post(body)
    assert (refused.status_code, refused.json()["error"]["code"]) == (400, "1301")
    assert refused.json()["contentFilter"] == [{"level": 1, "role": "assistant"}]
    client = zhipuai.ZhipuAI(api_key=server.key, base_url=server.v4)
    chunks = list(client.chat.completions.create(stream=True, **body))
    assert chunks[-1].choices[0].finish_reason == "sensitive"
    assert "Paris" not in "".join(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].model_extra["content_filter"] == [{"role": "assistant", "level": 1}]


def test_per_key_concurrency(server: Server) -> None:
    story = {"model": "glm-4", "messages": STORY, "max_tokens": 300, "do_sample": False, "stream": True}
    with httpx.stream(
        "POST",
        f"{server.v4}/chat/completions",
        json=story,
        timeout=120,
        headers={"Authorization": server.limited_key},
    ) as running:
        lines = running.iter_lines()  # kept: a discarded iterator closes the connection, which aborts
        next(lines)  # generating now
        refused = server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key)
        assert (refused.status_code, refused.json().get("error", {}).get("code")) == (429, "1302"), (
            refused.text
        )
        assert (
            server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}).status_code == 200
        )  # other key
    server.wait_idle()
    assert (
        server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key).status_code
        == 200
    )


def test_disconnect_aborts_and_frees_the_slot(server: Server) -> None:
    story = {"model": "glm-4", "messages": STORY, "max_tokens": 400, "do_sample": False}
    with httpx.stream(
        "POST",
        f"{server.v4}/chat/completions",
        json={**story, "stream": True},
        timeout=120,
        headers={"Authorization": server.limited_key},
    ) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    server.wait_idle()
    assert server.metric("glmstack_engine_kv_blocks_in_use") == 0
    # A non-streamed request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        server.post(story, key=server.limited_key, timeout=1.0)
    server.wait_idle()
    assert (
        server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key).status_code
        == 200
    )


def test_classic_endpoint(server: Server) -> None:
    reply = server.post(
        {
            "prompt": "Say hi.",
            "history": [["Hello", "Hi! How can I help?"]],
            "max_length": 200,
            "temperature": 0.0,
        },
        path="/",
    ).json()
    assert reply["status"] == 200 and reply["response"]
    assert reply["history"] == [["Hello", "Hi! How can I help?"], ["Say hi.", reply["response"]]]


def test_health_metrics_and_usage(server: Server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["database"] and health["model"]["loaded"]
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert (
        server.metric('glmstack_http_requests_total{method="POST",route="/chat/completions",status="200"}')
        > 0
    )
    assert server.metric("glmstack_engine_kv_blocks_total") > 0
    key_id = server.key.split(".")[0]
    server.wait_idle()
    deadline = time.monotonic() + 10
    while not (rows := server.store.usage.report(key_id)) and time.monotonic() < deadline:
        time.sleep(0.05)  # usage is written behind the replies, within half a second
    [row] = rows
    assert row.requests > 5 and row.prompt_tokens > 0 and row.completion_tokens > 0


def test_open_when_no_key_is_active(server: Server) -> None:
    """Runs last: revokes every key. The server is on 127.0.0.1, so it then serves without credentials."""
    for record in server.store.keys.list():
        server.store.keys.revoke(record.id)
    response = httpx.post(
        f"{server.v4}/chat/completions", json={"model": "glm-4", "messages": HI, "max_tokens": 2}
    )
    assert response.status_code == 200


def test_refuses_to_serve_open_beyond_loopback(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "GLMSTACK_HOME": str(tmp_path),
        "GLMSTACK_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
    }
    done = subprocess.run(
        [sys.executable, "-m", "glmstack.cli.main", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "without API keys" in done.stderr
