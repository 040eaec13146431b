"""Fine-tuning jobs through the platform (spec §2.13) with the official zhipuai SDK against a real socket: a
job trains a tiny GLM-4-9B-chat in a child process (`python -m glmstack.finetune`), reports loss events, and
its `ft:` model answers chat at once; cancel stops it; a server stopped mid-training leaves the job for the next
server, which resumes from the last checkpoint without repeating a step; bad requests get the documented
errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zhipuai
from finetune_models import facts, glm4_checkpoint, write_jsonl

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/servers.py
from servers import LiveServer, wait_for

from glmstack import load
from glmstack.api import create_app
from glmstack.engine.serving.async_engine import AsyncEngine
from glmstack.settings import Settings
from glmstack.store import Store

pytestmark = pytest.mark.slow

BASE = "/api/paas/v4"




@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return glm4_checkpoint(tmp_path_factory.mktemp("glm4"))


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[AsyncEngine]:
    model, _ = load(checkpoint, device="cpu", dtype="float32")
    engine = AsyncEngine(model, kv_cache_bytes=16 << 20)
    yield engine
    engine.shutdown()


class Platform:
    def __init__(self, home: Path, checkpoint: Path, engine: AsyncEngine) -> None:
        self.store = Store(f"sqlite:///{home / 'glmstack.db'}", home=home)
        self.key = self.store.keys.create("tests")[1]
        settings = Settings(home=home, database_url="unused", model=str(checkpoint), finetune_threads=1)
        self.server = LiveServer(create_app(settings, engine, self.store))
        self.client = self.client_for(self.key)

    def client_for(self, key: str) -> zhipuai.ZhipuAI:
        return zhipuai.ZhipuAI(api_key=key, base_url=f"{self.server.url}{BASE}", max_retries=0)

    def restart(self, checkpoint: Path, engine: AsyncEngine) -> None:
        self.server.stop()
        settings = Settings(home=self.store.blobs.root.parent, database_url="unused", model=str(checkpoint),
                            finetune_threads=1)
        self.server = LiveServer(create_app(settings, engine, self.store))
        self.client = zhipuai.ZhipuAI(api_key=self.key, base_url=f"{self.server.url}{BASE}", max_retries=0)

    def upload(self, path: Path) -> str:
        with path.open("rb") as f:
            return self.client.files.create(file=f, purpose="fine-tune").id

    def close(self) -> None:
        self.server.stop()
        self.store.close()


@pytest.fixture
def platform(tmp_path: Path, checkpoint: Path, engine: AsyncEngine) -> Iterator[Platform]:
    p = Platform(tmp_path, checkpoint, engine)
    yield p
    p.close()
    for name in list(engine.adapters()):
        engine.unload_adapter(name)


def finished(client: zhipuai.ZhipuAI, job_id: str) -> Any:
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in
                    ("succeeded", "failed", "cancelled") and j)


def metrics(client: zhipuai.ZhipuAI, job_id: str) -> list[Any]:
    """The training steps' metrics, as the SDK parses them (its Metric model)."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    return [e.data for e in events if e.type == "metrics" and e.data is not None and e.data.loss is not None]


def test_a_job_trains_and_its_model_answers_chat(platform: Platform, tmp_path: Path) -> None:
    client = platform.client
    train = platform.upload(write_jsonl(tmp_path / "train.jsonl", facts(16)))
    valid = platform.upload(write_jsonl(tmp_path / "valid.jsonl", facts(4)))
    job = client.fine_tuning.jobs.create(
        model="glm-4", training_file=train, validation_file=valid, suffix="demo",
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 2},
        extra_body={"extra_hyperparameters": {"max_steps": 4, "eval_every": 2}})
    assert job.status == "created" and job.fine_tuned_model.startswith("ft:glm-4:demo:")
    assert job.id.startswith("ftjob-") and job.training_file == train and job.result_files == []
    done = finished(client, job.id)
    assert done.status == "succeeded", client.fine_tuning.jobs.list_events(job.id, limit=100)
    steps = metrics(client, job.id)
    assert [m.current_steps for m in steps] == [1, 2, 3, 4]
    assert all(m.loss > 0 and ":" in m.elapsed_time and m.total_steps == 4 for m in steps)
    assert steps[-1].trained_tokens > steps[0].trained_tokens > 0
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.message]
    assert "Files validated, moving job to queued state" in messages
    assert done.result_files and done.trained_tokens
    reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                           messages=[{"role": "user", "content": "代号 1?"}])
    assert reply.choices[0].finish_reason in ("stop", "length")
    page = client.fine_tuning.jobs.list(limit=10)
    assert [j.id for j in page.data] == [job.id]
    # the model is the job's key's, as on the hosted platform: another key neither lists nor calls it
    other_key = platform.store.keys.create("another team")[1]
    other = platform.client_for(other_key)
    assert other.fine_tuning.jobs.list(limit=10).data == []
    with pytest.raises(zhipuai.APIStatusError) as hidden:
        other.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert hidden.value.status_code == 400 and "1211" in str(hidden.value)
    def listed(key: str) -> list[str]:
        page = httpx.get(f"{platform.server.url}{BASE}/models", headers={"Authorization": f"Bearer {key}"})
        return [card["id"] for card in page.raise_for_status().json()["data"]]

    assert done.fine_tuned_model in listed(platform.key) and done.fine_tuned_model not in listed(other_key)
    deleted = client.fine_tuning.models.delete(fine_tuned_model=done.fine_tuned_model)
    assert deleted.delete_status == "deleted" and deleted.model_name == done.fine_tuned_model
    with pytest.raises(zhipuai.APIStatusError) as gone:
        client.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    assert gone.value.status_code == 400 and "1211" in str(gone.value)


def test_cancel_stops_the_trainer(platform: Platform, tmp_path: Path) -> None:
    client = platform.client
    train = platform.upload(write_jsonl(tmp_path / "train.jsonl", facts(16)))
    job = client.fine_tuning.jobs.create(model="glm-4", training_file=train,
                                         hyperparameters={"n_epochs": 10, "batch_size": 1})
    wait_for(lambda: len(metrics(client, job.id)) >= 2)
    client.fine_tuning.jobs.cancel(job.id)
    done = finished(client, job.id)
    assert done.status == "cancelled" and len(metrics(client, job.id)) < 16 * 10
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.message]
    assert messages[-1] == "Job cancelled"


def test_a_job_left_by_a_stopped_server_resumes_from_its_checkpoint(platform: Platform, tmp_path: Path,
                                                                   checkpoint: Path, engine: AsyncEngine) -> None:
    client = platform.client
    train = platform.upload(write_jsonl(tmp_path / "train.jsonl", facts(16)))
    job = client.fine_tuning.jobs.create(
        model="glm-4", training_file=train, hyperparameters={"n_epochs": 10, "batch_size": 2},
        extra_body={"extra_hyperparameters": {"max_steps": 12, "save_every": 2}})
    wait_for(lambda: len(metrics(client, job.id)) >= 3)
    platform.restart(checkpoint, engine)  # the trainer checkpoints at SIGTERM; the job stays running
    client = platform.client
    done = finished(client, job.id)
    assert done.status == "succeeded"
    steps = [m.current_steps for m in metrics(client, job.id)]
    assert steps == list(range(1, 13))  # every step once: those redone after the checkpoint are not repeated
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.message]
    assert "Resuming training from the last checkpoint" in messages


def test_bad_requests(platform: Platform, tmp_path: Path) -> None:
    client = platform.client
    train = platform.upload(write_jsonl(tmp_path / "train.jsonl", facts(4)))
    with pytest.raises(zhipuai.APIStatusError) as unknown_model:
        client.fine_tuning.jobs.create(model="nobody", training_file=train)
    assert "1211" in str(unknown_model.value)
    with pytest.raises(zhipuai.APIStatusError) as no_file:
        client.fine_tuning.jobs.create(model="glm-4", training_file="file-nope")
    assert no_file.value.status_code == 404
    with pytest.raises(zhipuai.APIStatusError) as too_many:
        client.fine_tuning.jobs.create(model="glm-4", training_file=train, hyperparameters={"n_epochs": 11})
    assert "1214" in str(too_many.value) and "n_epochs" in str(too_many.value)
    with pytest.raises(zhipuai.APIStatusError) as bad_init:
        client.fine_tuning.jobs.create(model="glm-4", training_file=train, extra_body={
            "fine_tuning_method": "ptuning", "extra_hyperparameters": {"prefix_init": "zeros"}})
    assert "1214" in str(bad_init.value) and "prefix_init" in str(bad_init.value)
    with pytest.raises(zhipuai.APIStatusError) as misplaced:  # a LoRA job would ignore it
        client.fine_tuning.jobs.create(model="glm-4", training_file=train, extra_body={
            "extra_hyperparameters": {"pre_seq_len": 64}})
    assert "1214" in str(misplaced.value) and "pre_seq_len apply to fine_tuning_method 'ptuning'" in str(
        misplaced.value)
    with pytest.raises(zhipuai.APIStatusError) as missing:
        client.fine_tuning.jobs.retrieve("ftjob-20240101000000000-nope0")
    assert missing.value.status_code == 404
