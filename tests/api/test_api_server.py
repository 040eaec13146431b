"""End to end: `glmstack serve` on the bundled model, driven by the official SDKs (zhipuai, zai-sdk, openai)
and by raw httpx for the wire details and every error path. The server is started once per module and
database (SQLite, then PostgreSQL when GLMSTACK_TEST_POSTGRES_URL is set); replies are kept a few tokens long.
Each test gets API keys of its own and an idle server, so it passes alone and in any order.

The server's safety list is the test's own: "Paris" (so a question about France trips the output check)
and "forbiddenword" (the input check)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import openai
import pytest
import zhipuai
from servers import parse_metrics, postgres_schema, serving
from zai import ZhipuAiClient

from glmstack.store import Store

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Say hi."}]
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# Greedy decoding of this runs to any max_tokens we use on the bundled model: a request that stays busy.
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
# A held request: STORY to this many tokens takes the bundled model tens of seconds at the least, so it is
# still generating when the test acts on it. The tests check that it was: it ends as an abort (ABORTED).
HELD_MAX_TOKENS = 2000
ABORTED = 'glmstack_completions_total{finish_reason="abort"}'
CHAT_OK = 'glmstack_http_requests_total{method="POST",route="/chat/completions",status="200"}'
DEADLINE_S = 60  # every wait on the server ends by then, or fails saying what it was waiting for


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
class Served:
    """The running `glmstack serve` process, shared by the module's tests."""

    url: str
    proc: subprocess.Popen
    log: Path
    store: Store

    def check_alive(self) -> None:
        if (status := self.proc.poll()) is not None:
            pytest.fail(
                f"the server exited with status {status}; its log ends:\n{self.log.read_text()[-3000:]}"
            )


@dataclass
class Server:
    """What a test sees: the shared server, with keys of the test's own."""

    served: Served
    key: str  # "id.secret"
    limited_key: str  # concurrency_limit=1

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def store(self) -> Store:
        return self.served.store

    @property
    def v4(self) -> str:
        return f"{self.url}/api/paas/v4"

    def post(
        self, body: dict, key: str | None = None, path: str = "/api/paas/v4/chat/completions", **kwargs
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, json=body, headers=headers, **{"timeout": 120, **kwargs})

    def open_request(self, body: dict, key: str) -> http.client.HTTPConnection:
        """Sends a chat request on a connection of its own and leaves the reply unread: closing the
        connection is the client hanging up."""
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=DEADLINE_S)
        connection.request(
            "POST",
            "/api/paas/v4/chat/completions",
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        return connection

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by its full name, labels included."""
        self.served.check_alive()
        return parse_metrics(httpx.get(f"{self.url}/metrics", headers={"Authorization": self.key}, timeout=30).text)

    def metric(self, name: str, default: float | None = None) -> float:
        """One sample; `default` for a counter that has not been counted yet (it is absent until then)."""
        samples = self.metrics()
        if name not in samples and default is None:
            pytest.fail(f"{name} not in /metrics")
        return samples.get(name, default)

    def wait_until(self, condition: Callable[[dict[str, float]], bool], what: str) -> dict[str, float]:
        """Polls /metrics until `condition(samples)` holds and returns those samples; fails after
        DEADLINE_S, or at once if the server has exited."""
        deadline = time.monotonic() + DEADLINE_S
        while not condition(samples := self.metrics()):
            if time.monotonic() > deadline:
                busy = {name: value for name, value in samples.items() if name.startswith("glmstack_engine")}
                pytest.fail(
                    f"waiting for {what}: not reached within {DEADLINE_S} s; in flight: "
                    f"{samples.get('glmstack_requests_in_flight')}, engine: {busy}"
                )
            time.sleep(0.05)
        return samples

    def wait_idle(self) -> None:
        """Until no generation is admitted or known to the engine."""
        names = ("glmstack_requests_in_flight", "glmstack_engine_running", "glmstack_engine_waiting")
        self.wait_until(lambda samples: not any(samples.get(n) for n in names), "the server to be idle")


@pytest.fixture(scope="module")
def served(server_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("home")
    safety = home / "safety"
    safety.mkdir()
    (safety / "terms.txt").write_text("Paris\nforbiddenword\n", encoding="utf-8")
    store = Store(server_database_url, home=home)
    store.keys.create("launch")  # the server starts keyed, as it would in production
    env = {
        **os.environ,
        "GLMSTACK_HOME": str(home),
        "GLMSTACK_DATABASE_URL": server_database_url,
        "GLMSTACK_SAFETY_DIR": str(safety),
        "GLMSTACK_MAX_BODY_BYTES": "65536",
        "GLMSTACK_LOG_LEVEL": "INFO",
    }
    log = home / "server.log"
    try:
        with serving(["--port", "0", "--device", "cpu"], env, log) as (proc, url):
            yield Served(url, proc, log, store)
    finally:
        store.close()


@pytest.fixture
def server(served: Served) -> Server:
    """The shared server, alive and idle, with two fresh keys for this test alone: whatever another test did
    (revoked every key, held a key's slot, wrote usage) does not reach this one."""
    served.check_alive()
    _, key = served.store.keys.create("e2e")
    _, limited = served.store.keys.create("one at a time", concurrency_limit=1)
    server = Server(served, key, limited)
    server.wait_idle()
    return server


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

    # the code the Z.ai SDK's own examples send
    chunks = list(client.chat.completions.create(model="glm-4.5", messages=HI, max_tokens=6, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].model == "glm-4.5"
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
    with pytest.raises(
        zhipuai.APIAuthenticationError, match=r"^Error code: 401, with error text \{"
    ) as caught:
        bad.chat.completions.create(model="glm-4", messages=HI)
    assert caught.value.response.json()["error"]["code"] == "1000"
    good = zhipuai.ZhipuAI(api_key=server.key, base_url=server.v4)
    # The SDK's only view of the business code is the body text in its message
    with pytest.raises(zhipuai.APIRequestFailedError, match=r'^Error code: 400, with error text .*"1211"'):
        good.chat.completions.create(model="not-a-model", messages=HI)
    with pytest.raises(openai.AuthenticationError, match=r"^Error code: 401 - ") as oai:
        openai.OpenAI(api_key="nobody.wrong", base_url=f"{server.url}/v1").models.list()
    assert oai.value.code == "1000"
    with pytest.raises(openai.BadRequestError, match=r"^Error code: 400 - .*temperature") as oai:
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
    """While a key's one slot is held, its next request is refused and other keys are served; once the
    held request is gone, the key is served again."""
    aborted = server.metric(ABORTED, 0)
    story = {"model": "glm-4", "messages": STORY, "max_tokens": HELD_MAX_TOKENS, "do_sample": False}
    with httpx.stream(
        "POST",
        f"{server.v4}/chat/completions",
        json={**story, "stream": True},
        timeout=120,
        headers={"Authorization": server.limited_key},
    ) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a discarded iterator closes the connection, which aborts
        assert next(lines).startswith("data: {")  # the slot is taken: the reply has begun
        refused = server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key)
        assert (refused.status_code, refused.json().get("error", {}).get("code")) == (429, "1302"), (
            refused.text
        )
        other_key = server.post({"model": "glm-4", "messages": HI, "max_tokens": 2})
        assert other_key.status_code == 200, other_key.text
    # Leaving the block hung up on the held request. That it ended as an abort (not by running out of
    # tokens) shows it still held the slot when the refusal came.
    server.wait_idle()
    assert server.metric(ABORTED, 0) == aborted + 1
    after = server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key)
    assert after.status_code == 200, after.text


def test_disconnect_aborts_and_frees_the_slot(server: Server) -> None:
    aborted = server.metric(ABORTED, 0)
    story = {"model": "glm-4", "messages": STORY, "max_tokens": HELD_MAX_TOKENS, "do_sample": False}
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
    assert server.metric(ABORTED, 0) == aborted + 1

    # A non-streamed request whose client gives up is aborted too. The client hangs up once the engine
    # has decoded past the prompt (its KV blocks grew): the request has produced tokens, so its end is
    # counted, and it is far from its HELD_MAX_TOKENS.
    connection = server.open_request(story, key=server.limited_key)
    try:
        running = server.wait_until(
            lambda samples: samples.get("glmstack_engine_running") == 1, "the request to run in the engine"
        )
        prompt_blocks = running["glmstack_engine_kv_blocks_in_use"]
        server.wait_until(
            lambda samples: samples.get("glmstack_engine_kv_blocks_in_use", 0) > prompt_blocks,
            "the engine to decode past the prompt",
        )
    finally:
        connection.close()
    server.wait_idle()
    assert server.metric("glmstack_engine_kv_blocks_in_use") == 0
    assert server.metric(ABORTED, 0) == aborted + 2
    after = server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}, key=server.limited_key)
    assert after.status_code == 200, after.text


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
    assert server.metric("glmstack_engine_kv_blocks_total") > 0
    served_before = server.metric(CHAT_OK, 0)
    replies = [server.post({"model": "glm-4", "messages": HI, "max_tokens": 2}) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    # Counted as each reply's last byte goes out, which may be just after the client has it
    server.wait_until(lambda samples: samples.get(CHAT_OK, 0) >= served_before + 3, "3 more replies counted")

    key_id = server.key.split(".")[0]  # this test's own key: its usage is these three replies
    expected = (
        3,
        sum(r.json()["usage"]["prompt_tokens"] for r in replies),
        sum(r.json()["usage"]["completion_tokens"] for r in replies),
    )
    deadline = time.monotonic() + DEADLINE_S
    rows = server.store.usage.report(key_id)
    while [(row.requests, row.prompt_tokens, row.completion_tokens) for row in rows] != [expected]:
        if time.monotonic() > deadline:
            pytest.fail(
                f"usage for {key_id} is {rows} after {DEADLINE_S} s, expected (requests, prompt, "
                f"completion) = {expected}"
            )
        time.sleep(0.05)  # usage is written behind the replies, within half a second
        rows = server.store.usage.report(key_id)
    assert expected[1] > 0 and expected[2] > 0


def test_open_when_no_key_is_active(server: Server) -> None:
    """Revokes every key: the server is on 127.0.0.1, so it then serves without credentials. The tests after
    this one get keys of their own, which close it again."""
    body = {"model": "glm-4", "messages": HI, "max_tokens": 2}
    closed = httpx.post(f"{server.v4}/chat/completions", json=body, timeout=120)
    assert (closed.status_code, closed.json()["error"]["code"]) == (401, "1001")  # keys exist: keyed
    for record in server.store.keys.list():
        if record.active:
            server.store.keys.revoke(record.id)
    response = httpx.post(f"{server.v4}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


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
