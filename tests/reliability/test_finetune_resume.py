"""A fine-tuning job survives `kill -9` of its server: the trainer (a child process) dies with the server, the
job is left `running` with a lease naming a dead process, and the next server resumes it from its last
checkpoint - every step reported once, the job succeeds, its `ft:` model answers. Real `glmstack serve`
processes on the bundled model, the official zhipuai SDK."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest
import zhipuai
from platform_server import start_server, stop_server
from servers import wait_for

from glmstack.store import Store

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

STEPS = 10
ENV = {"GLMSTACK_FINETUNE_THREADS": "1", "GLMSTACK_SHUTDOWN_GRACE_S": "2"}




def training_file(path: Path) -> Path:
    lines = [{"messages": [{"role": "user", "content": f"Code word {i}?"},
                           {"role": "assistant", "content": f"ZX-{i * 7 % 13}"}]} for i in range(16)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def steps_reported(client: zhipuai.ZhipuAI, job_id: str) -> list[int]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    return sorted(e.data.current_steps for e in events
                  if e.type == "metrics" and e.data is not None and e.data.loss is not None)


def trainers_of(server_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(server_pid).children(recursive=True)
            if "glmstack.finetune" in " ".join(p.cmdline())]


def test_kill_9_mid_training_then_restart_resumes_the_job(tmp_path: Path) -> None:
    home, database_url = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'glmstack.db'}"
    first = start_server(home, database_url, ENV)
    client = zhipuai.ZhipuAI(api_key=first.key, base_url=f"{first.url}/api/paas/v4", max_retries=0)
    with training_file(tmp_path / "train.jsonl").open("rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="glm-4", training_file=file_id, hyperparameters={"batch_size": 1, "n_epochs": 1},
        extra_body={"extra_hyperparameters": {"max_steps": STEPS, "save_every": 2}})
    wait_for(lambda: len(steps_reported(client, job.id)) >= 3)
    [trainer] = trainers_of(first.proc.pid)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    # the trainer goes with its server (PR_SET_PDEATHSIG): no orphan keeps training or writing
    gone, alive = psutil.wait_procs([trainer], timeout=30)
    assert trainer in gone and not alive
    with Store(database_url, home=home) as store:
        left = store.fine_tuning.get_any(job.id)
    assert left is not None and left.status == "running"  # left as it was: the next server takes it up

    second = start_server(home, database_url, ENV)
    try:
        client = zhipuai.ZhipuAI(api_key=first.key, base_url=f"{second.url}/api/paas/v4", max_retries=0)
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
                        in ("succeeded", "failed", "cancelled") and j)
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.message]
        assert done.status == "succeeded", messages
        assert steps_reported(client, job.id) == list(range(1, STEPS + 1))  # each step once
        assert "Resuming training from the last checkpoint" in messages
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Code word 3?"}])
        assert reply.choices[0].message.content
    finally:
        stop_server(second)
