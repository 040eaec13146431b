"""Batches survive their server: `kill -9` mid-batch, start again -> the batch resumes and every line is in the
output exactly once; SIGTERM mid-batch -> the lines in flight get the grace period, the lease is released, and
the next server resumes at once. An async task in flight at the kill is finished by the next server. Real
`glmstack serve` processes on the bundled model."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import zhipuai
from platform_server import Server, start_server, stop_server
from servers import wait_for

from glmstack.store import Store

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

LINES = 40
MAX_TOKENS = 48
ENV = {"GLMSTACK_BATCH_CONCURRENCY": "2", "GLMSTACK_SHUTDOWN_GRACE_S": "2"}




def body(i: int) -> dict[str, Any]:
    return {"model": "glm-4", "temperature": 0, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"Write a short poem about the number {i}."}]}


def start_batch(server: Server, tmp_path: Path) -> tuple[zhipuai.ZhipuAI, str]:
    client = zhipuai.ZhipuAI(api_key=server.key, base_url=f"{server.url}/api/paas/v4", max_retries=0)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v4/chat/completions",
                                        "body": body(i)}) + "\n" for i in range(LINES)))
    with path.open("rb") as f:
        file_id = client.files.create(file=f, purpose="batch").id
    return client, client.batches.create(input_file_id=file_id, endpoint="/v4/chat/completions").id


def finish_on_a_new_server(home: Path, database_url: str, key: str, batch_id: str) -> tuple[Server, Any, list]:
    server = start_server(home, database_url, ENV)
    client = zhipuai.ZhipuAI(api_key=key, base_url=f"{server.url}/api/paas/v4", max_retries=0)
    done = wait_for(lambda: (b := client.batches.retrieve(batch_id)).status == "completed" and b)
    output = [json.loads(x) for x in client.files.content(done.output_file_id).content.decode().splitlines()]
    return server, done, output


def assert_every_line_once(done: Any, output: list[dict[str, Any]]) -> None:
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (LINES, LINES, 0)
    assert [r["custom_id"] for r in output] == [f"r{i}" for i in range(LINES)]
    assert all(r["response"]["status_code"] == 200 for r in output)


def test_kill_9_mid_batch_then_restart_writes_every_line_once(tmp_path: Path) -> None:
    home, database_url = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'glmstack.db'}"
    first = start_server(home, database_url, ENV)
    client, batch_id = start_batch(first, tmp_path)
    task = client.chat.asyncCompletions.create(**body(999))
    wait_for(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 4)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    with Store(database_url, home=home) as store:
        batch = store.batches.get_any(batch_id)
        # what kill -9 leaves: in progress, some lines written, a lease naming a process that is gone
        assert batch is not None and batch.status == "in_progress" and batch.lease_owner is not None
        assert 4 <= batch.request_completed < LINES
    second, done, output = finish_on_a_new_server(home, database_url, first.key, batch_id)
    try:
        assert_every_line_once(done, output)
        # what was written before the kill is kept as it was; a line is the same answer as a sync call
        sync = second.chat(**body(7)).json()
        assert output[7]["response"]["body"]["choices"][0]["message"]["content"] == \
            sync["choices"][0]["message"]["content"]
        again = zhipuai.ZhipuAI(api_key=first.key, base_url=f"{second.url}/api/paas/v4", max_retries=0)
        result = wait_for(lambda: (r := again.chat.asyncCompletions.retrieve_completion_result(task.id))
                          .task_status != "PROCESSING" and r)
        assert result.task_status == "SUCCESS" and result.choices[0].message.content
    finally:
        stop_server(second)


def test_sigterm_mid_batch_releases_it_for_the_next_server(tmp_path: Path) -> None:
    home, database_url = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'glmstack.db'}"
    first = start_server(home, database_url, ENV)
    client, batch_id = start_batch(first, tmp_path)
    wait_for(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 2)
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(timeout=60)
    log = (home / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    with Store(database_url, home=home) as store:
        batch = store.batches.get_any(batch_id)
        # checkpointed: still in progress, every finished line written, and nobody's lease on it
        assert batch is not None and batch.status == "in_progress" and batch.lease_owner is None
        assert batch.request_completed == len(store.batches.done_lines(batch_id)) < LINES
    second, done, output = finish_on_a_new_server(home, database_url, first.key, batch_id)
    try:
        assert_every_line_once(done, output)
    finally:
        stop_server(second)
