"""Graceful shutdown of the real server: at SIGTERM it stops accepting connections, lets requests in flight
run for GLMSTACK_SHUTDOWN_GRACE_S, and ends a reply still running at that deadline with error 1234 - an error
event the SDKs raise, then a last chunk with finish_reason "network_error" - instead of cutting it
mid-sentence. Each test starts (and stops) a server of its own: SIGTERM is the thing under test."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zhipuai
from platform_server import CHAT, Server, record, running_server

from glmstack.api.shutdown import CUT_DETAIL

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

GRACE_S = 3
# Generous: the grace, uvicorn's margin after it (serve.py: 3 s), and a busy 2-core machine's slack.
EXIT_WITHIN_S = GRACE_S + 3 + 30
# Greedy decoding of this runs to any max_tokens we use on the bundled model (tests/api/test_api_server.py):
# at 2000 tokens a reply takes the bundled model tens of seconds at the least, far beyond the grace.
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
LONG = 2000
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    env = {"GLMSTACK_SHUTDOWN_GRACE_S": str(GRACE_S)}
    with running_server(tmp_path, f"sqlite:///{tmp_path / 'glmstack.db'}", env) as server:
        yield server


class InThread:
    """Runs `work(started)` in a thread; `started()` is for the work to call once its request is in flight
    (its first chunk has arrived). The result, or the exception, is kept for the test."""

    def __init__(self, work: Callable[[Callable[[], None]], Any]) -> None:
        self.started = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self.thread.start()

    def _run(self, work: Callable[[Callable[[], None]], Any]) -> None:
        try:
            self.result = work(self.started.set)
        except BaseException as e:  # the test inspects it
            self.error = e
        finally:
            self.started.set()  # a failure before the first chunk must not leave the test waiting

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request did not end"


def raw_stream(server: Server, body: dict[str, Any], started: Callable[[], None]) -> list[Any]:
    """The stream's events as sent: parsed JSON payloads, and "[DONE]"."""
    events: list[Any] = []
    with httpx.stream("POST", server.url + CHAT, json={"model": "glm-4", "stream": True, **body},
                      headers=server.auth, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
                started()
    return events


def sigterm_when_started(server: Server, *requests: InThread) -> float:
    """Sends SIGTERM once every request has its first chunk; returns when (time.monotonic())."""
    for request in requests:
        assert request.started.wait(120), "no first chunk"
        assert request.error is None, request.error
    server.proc.send_signal(signal.SIGTERM)
    return time.monotonic()


def assert_exits(server: Server, sigterm_at: float) -> None:
    server.proc.wait(timeout=EXIT_WITHIN_S)
    record("shutdown", exit_after_sigterm_s=round(time.monotonic() - sigterm_at, 2), grace_s=GRACE_S)
    # uvicorn re-raises the signal it caught once it has shut down, so the process ends by SIGTERM
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert "draining for 3 s" in (server.home / "server.log").read_text()


def test_a_stream_running_at_the_deadline_ends_with_an_error_the_sdks_raise(server: Server) -> None:
    long_body = {"messages": STORY, "max_tokens": LONG, "temperature": 0}
    raw = InThread(lambda started: raw_stream(server, long_body, started))

    def zhipu(started: Callable[[], None]) -> list[Any]:
        client = zhipuai.ZhipuAI(api_key=server.key, base_url=server.url + "/api/paas/v4", max_retries=0)
        chunks = []
        for chunk in client.chat.completions.create(model="glm-4", messages=STORY, max_tokens=LONG,
                                                    do_sample=False, stream=True):
            chunks.append(chunk)
            started()
        return chunks

    def openai_sdk(started: Callable[[], None]) -> list[Any]:
        client = openai.OpenAI(api_key=server.key, base_url=server.url + "/v1", max_retries=0)
        chunks = []
        for chunk in client.chat.completions.create(model="glm-4", messages=STORY,  # type: ignore[arg-type]
                                                    max_tokens=LONG, temperature=0, stream=True):
            chunks.append(chunk)
            started()
        return chunks

    zhipu_run, openai_run = InThread(zhipu), InThread(openai_sdk)
    sigterm_at = sigterm_when_started(server, raw, zhipu_run, openai_run)
    for run in (raw, zhipu_run, openai_run):
        run.join(GRACE_S + 60)
    assert_exits(server, sigterm_at)

    # On the wire: text chunks, then the error, then the last chunk and [DONE].
    assert raw.error is None, raw.error
    events = raw.result
    *text, error, last, done = events
    assert text and all("finish_reason" not in chunk["choices"][0] for chunk in text)
    assert error["error"]["code"] == "1234" and CUT_DETAIL in error["error"]["message"]
    assert last["choices"][0]["finish_reason"] == "network_error"
    usage = last["usage"]
    assert 0 < usage["completion_tokens"] < LONG
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert done == "[DONE]"

    # The SDKs raise at the error event, after the text chunks they yielded.
    assert isinstance(zhipu_run.error, zhipuai.APIResponseError), zhipu_run.error
    assert zhipu_run.error.json_data["code"] == "1234"
    assert isinstance(openai_run.error, openai.APIError), openai_run.error
    assert openai_run.error.code == "1234" and CUT_DETAIL in openai_run.error.message


def test_requests_that_finish_within_the_grace_end_normally(server: Server) -> None:
    short = InThread(lambda started: raw_stream(server, {"messages": HI, "max_tokens": 16,
                                                         "temperature": 0}, started))
    # One long reply keeps the server draining for the whole grace while the checks below run.
    long = InThread(lambda started: raw_stream(server, {"messages": STORY, "max_tokens": LONG,
                                                        "temperature": 0}, started))
    sigterm_at = sigterm_when_started(server, short, long)
    short.join(GRACE_S + 60)
    long.join(GRACE_S + 60)
    assert_exits(server, sigterm_at)

    assert short.error is None, short.error
    *text, last, done = short.result
    assert all("error" not in event for event in text + [last]) and done == "[DONE]"
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert long.error is None and any("error" in event for event in long.result if event != "[DONE]")


def test_after_sigterm_new_connections_are_refused_and_a_sync_reply_cut_is_a_500(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    long = InThread(lambda started: raw_stream(server, {"messages": STORY, "max_tokens": LONG,
                                                        "temperature": 0}, started))

    def sync(path: str, body: dict[str, Any]) -> Callable[[Callable[[], None]], httpx.Response]:
        return lambda _: httpx.post(server.url + path, json=body, headers=server.auth, timeout=120)

    chat = InThread(sync(CHAT, {"model": "glm-4", "messages": STORY, "max_tokens": LONG, "temperature": 0}))
    classic = InThread(sync("/", {"prompt": STORY[0]["content"], "history": [], "max_length": LONG + 64,
                                  "temperature": 0}))
    assert long.started.wait(120) and long.error is None, long.error
    server.wait_until(lambda samples: samples.get("glmstack_requests_in_flight", 0) >= 3, 120)
    server.proc.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()

    refused = False
    while long.thread.is_alive() and not refused:  # while the reply in flight still runs
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            time.sleep(0.05)
        except ConnectionRefusedError:
            refused = True
    assert refused and server.proc.poll() is None, "a new connection was accepted while draining"

    for run in (long, chat, classic):
        run.join(GRACE_S + 60)
    assert_exits(server, sigterm_at)
    for run in (chat, classic):
        assert run.error is None, run.error
        response = run.result
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "1234" and CUT_DETAIL in error["message"]
