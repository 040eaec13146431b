"""The server as the README starts it: `glmstack serve` with a fresh home, no flags and no keys (only the port
comes from GLMSTACK_PORT=0, so tests can run side by side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from servers import launch_serve

pytestmark = pytest.mark.slow

CHAT = "/api/paas/v4/chat/completions"


@pytest.fixture
def readme_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], Path]]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("GLMSTACK_")}
    env |= {"GLMSTACK_HOME": str(tmp_path / "home"), "GLMSTACK_PORT": "0"}
    proc, url = launch_serve([], env, tmp_path / "server.log")
    try:
        yield url, env, tmp_path / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def stream_chat(url: str, headers: dict[str, str], content: str, max_tokens: int) -> tuple[int, list[dict]]:
    """One streamed chat: (HTTP status, the decoded `data:` events, or the error body as one event)."""
    body = {"model": "glm-4", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", url + CHAT, json=body, headers=headers, timeout=300) as response:
        if response.status_code != 200:
            return response.status_code, [json.loads(response.read())]
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return 200, [json.loads(e) for e in events[:-1]]


def test_start_up_is_quiet(readme_server) -> None:
    """The banner (stdout) and nothing from the libraries: no migration or server-process INFO lines."""
    _, _, log = readme_server
    lines = log.read_text().splitlines()
    assert [line for line in lines if not line.startswith(("INFO glmstack.", "WARNING glmstack."))] == []


def test_sixteen_concurrent_streams_from_one_open_caller(readme_server) -> None:
    url, _, _ = readme_server
    headers = {"Authorization": "Bearer local.any"}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: stream_chat(url, headers, f"Count to {i + 3}.", 24), range(16)))
    statuses = [status for status, _ in results]
    assert statuses == [200] * 16, [events for status, events in results if status != 200]
    for _, events in results:
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_keys_own_concurrency_limit_still_applies(readme_server) -> None:
    url, env, _ = readme_server
    created = subprocess.run([sys.executable, "-m", "glmstack.cli", "keys", "create", "--concurrency", "2"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    headers = {"Authorization": f"Bearer {created.stdout.strip()}"}
    # Greedy, this story runs to 2,000 tokens: tens of seconds on the bundled model.
    body = {"model": "glm-4", "stream": True, "max_tokens": 2000, "do_sample": False,
            "messages": [{"role": "user", "content": "Write a long story about a dragon and a knight."}]}
    with ExitStack() as held:
        streams = []
        for _ in range(2):  # two long streams, each past its first chunk: both hold a slot
            response = held.enter_context(httpx.stream("POST", url + CHAT, json=body, headers=headers, timeout=300))
            assert response.status_code == 200
            lines = (line for line in response.iter_lines() if line)
            assert next(lines).startswith("data: {")
            streams.append(lines)
        third = httpx.post(url + CHAT, json=body, headers=headers, timeout=60)
        for lines in streams:  # and both were still generating when the third was refused
            assert next(lines).startswith("data: {")
    assert third.status_code == 429 and third.json()["error"]["code"] == "1302"
    # the open caller has no such limit, but once a key exists the server wants one
    assert httpx.post(url + CHAT, json=body, timeout=60).status_code == 401



def test_the_bundled_model_advertises_its_own_sampling_defaults(readme_server) -> None:
    """SmolLM2's model card samples at temperature 0.2, top_p 0.9, not the platform's 0.95 / 0.7 (on a 135M
    model those mostly answer the README's question in French)."""
    url, _, _ = readme_server
    card = httpx.get(url + "/api/paas/v4/models/glm-4", timeout=30).json()["generation_defaults"]
    assert card == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 1024, "source": "model card: SmolLM2"}
