"""Async chat (spec §2.3-2.4) through the official zhipuai SDK against a real socket: a task is PROCESSING,
then SUCCESS with the reply (or FAIL with what the sync call would have answered); refusals come at once;
tasks belong to their key; a task left by a dead server is run again, and one that keeps dying fails visibly.
On SQLite and PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zhipuai
from scripted import ScriptedEngine
from servers import LiveServer, wait_for
from sqlalchemy import update

from glmstack.api import create_app
from glmstack.protocol import PromptTooLongError
from glmstack.settings import Settings
from glmstack.store import Store
from glmstack.store.async_tasks import MAX_ATTEMPTS
from glmstack.store.tables import async_tasks

BASE = "/api/paas/v4"
MESSAGES = [{"role": "user", "content": "讲一个故事"}]


def serve(store: Store, tmp_path: Path, engine: ScriptedEngine) -> LiveServer:
    return LiveServer(create_app(Settings(home=tmp_path, database_url="unused"), engine, store))


@pytest.fixture
def live(store: Store, tmp_path: Path, engine: ScriptedEngine) -> Iterator[LiveServer]:
    server = serve(store, tmp_path, engine)
    yield server
    server.stop()


def sdk(live: LiveServer, key: str) -> zhipuai.ZhipuAI:
    return zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}{BASE}", max_retries=0)


def result(client: zhipuai.ZhipuAI, task_id: str) -> Any:
    return wait_for(lambda: (r := client.chat.asyncCompletions.retrieve_completion_result(task_id))
                    .task_status != "PROCESSING" and r)


def test_an_async_task_runs_to_success(live: LiveServer, key: str, engine: ScriptedEngine) -> None:
    client = sdk(live, key)
    task = client.chat.asyncCompletions.create(model="glm-4", messages=MESSAGES, request_id="mine-1")
    assert task.task_status == "PROCESSING" and task.model == "glm-4" and task.request_id == "mine-1"
    assert task.id.isdigit()
    done = result(client, task.id)
    assert done.task_status == "SUCCESS" and done.request_id == "mine-1" and done.model == "glm-4"
    assert done.choices[0].message.content == "Hello there!" and done.choices[0].finish_reason == "stop"
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens > 0
    assert engine.requests[-1].background  # scheduled after interactive requests
    # a result can be read again
    assert client.chat.asyncCompletions.retrieve_completion_result(task.id).task_status == "SUCCESS"


def test_refusals_come_at_once_and_failures_are_visible(live: LiveServer, key: str, engine: ScriptedEngine) -> None:
    http = httpx.Client(base_url=f"{live.url}{BASE}", headers={"Authorization": f"Bearer {key}"})
    cases = [
        ({"model": "glm-4", "messages": MESSAGES, "stream": True}, "1214"),
        ({"model": "nobody", "messages": MESSAGES}, "1211"),
        ({"model": "glm-4", "messages": MESSAGES, "temperature": 9}, "1214"),
        ({"model": "glm-4"}, "1213"),
    ]
    for body, code in cases:
        response = http.post("/async/chat/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text
    missing = http.get("/async-result/12345")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "1233"
    engine.error = PromptTooLongError("prompt is 9000 tokens; the context window is 4096")
    client = sdk(live, key)
    failed = result(client, client.chat.asyncCompletions.create(model="glm-4", messages=MESSAGES).id)
    assert failed.task_status == "FAIL"
    raw = http.get(f"/async-result/{failed.id}").json()
    assert raw["error"]["code"] == "1261" and "choices" not in raw


def test_tasks_belong_to_their_key(live: LiveServer, store: Store, key: str) -> None:
    task = sdk(live, key).chat.asyncCompletions.create(model="glm-4", messages=MESSAGES)
    other = sdk(live, store.keys.create("other")[1])
    with pytest.raises(zhipuai.APIStatusError) as seen:
        other.chat.asyncCompletions.retrieve_completion_result(task.id)
    assert seen.value.status_code == 404


def test_a_task_left_by_a_dead_server_runs_again_and_one_that_keeps_dying_fails(store: Store, tmp_path: Path,
                                                                               key: str) -> None:
    key_id = key.split(".")[0]
    again = store.async_tasks.create(key_id, request_id=None, model="glm-4",
                                     body={"model": "glm-4", "messages": MESSAGES})
    doomed = store.async_tasks.create(key_id, request_id=None, model="glm-4",
                                      body={"model": "glm-4", "messages": MESSAGES})
    dead = f"{socket.gethostname()[:40]}:999999999:dead"
    with store._db.write() as conn:  # the test plays servers that died mid-task
        conn.execute(update(async_tasks).where(async_tasks.c.id == again.id).values(lease_owner=dead, attempts=1))
        conn.execute(update(async_tasks).where(async_tasks.c.id == doomed.id)
                     .values(lease_owner=dead, attempts=MAX_ATTEMPTS))
    engine = ScriptedEngine()
    server = serve(store, tmp_path, engine)
    try:
        client = sdk(server, key)
        assert result(client, again.id).task_status == "SUCCESS"
        failed = result(client, doomed.id)
        assert failed.task_status == "FAIL" and len(engine.requests) == 1
        assert store.async_tasks.get(key_id, again.id).attempts == 2  # type: ignore[union-attr]
    finally:
        server.stop()


def test_finished_results_are_deleted_after_their_time(store: Store) -> None:
    task = store.async_tasks.create(None, request_id=None, model="glm-4", body={})
    assert store.async_tasks.claim("me", 30) is not None
    assert store.async_tasks.finish(task.id, "me", "SUCCESS", {"choices": []})
    assert store.async_tasks.delete_finished_before(3600) == 0
    assert store.async_tasks.delete_finished_before(-1) == 1 and store.async_tasks.get(None, task.id) is None
