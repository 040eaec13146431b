"""The Batch API (spec §2.9, §4.3-4.5) through the official SDKs against a real socket: a batch runs to its
output and error files, bad lines land in the error file with the documented codes while the rest proceed,
cancel keeps what is done, and a batch left by a dead server resumes with every line written once. On SQLite
and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import zhipuai
from scripted import ScriptedEngine
from servers import LiveServer, wait_for

from glmstack.api import create_app
from glmstack.protocol import Embedder, GenerateRequest, GenerationEvent
from glmstack.settings import Settings
from glmstack.store import Store
from glmstack.store.leases import owner_tag

BASE = "/api/paas/v4"


def line(custom_id: str, content: str = "hi", url: str = "/v4/chat/completions", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": "glm-4", "messages": [{"role": "user", "content": content}], **body}}


def jsonl(*records: Any) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


class HeldEngine(ScriptedEngine):
    """Answers the first `free` requests at once and holds every later one until released (or aborted)."""

    def __init__(self, free: int) -> None:
        super().__init__()
        self.free = free
        self.calls = 0
        self.held = 0
        self.release: asyncio.Event | None = None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        self.calls += 1
        if self.calls > self.free:
            self.held += 1
            try:
                self.release = self.release or asyncio.Event()
                await self.release.wait()
            finally:
                self.held -= 1
        async for event in super().generate(request):
            yield event


def serve(store: Store, tmp_path: Path, engine: ScriptedEngine, embedder: Embedder | None = None,
          **overrides: Any) -> LiveServer:
    settings = Settings(home=tmp_path, database_url="unused", **overrides)
    embedders = {"embedding-2": embedder} if embedder is not None else None
    return LiveServer(create_app(settings, engine, store, embedders=embedders))


@pytest.fixture
def live(store: Store, tmp_path: Path, engine: ScriptedEngine) -> Iterator[LiveServer]:
    server = serve(store, tmp_path, engine, max_body_bytes=4096)
    yield server
    server.stop()


def sdk(live: LiveServer, key: str) -> zhipuai.ZhipuAI:
    return zhipuai.ZhipuAI(api_key=key, base_url=f"{live.url}{BASE}", max_retries=0)


def upload(client: zhipuai.ZhipuAI, tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(content)
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


def finished(client: zhipuai.ZhipuAI, batch_id: str, status: str = "completed") -> Any:
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status == status and b)


def records(client: zhipuai.ZhipuAI, file_id: str) -> list[dict[str, Any]]:
    text = client.files.content(file_id).content.decode()
    assert text.endswith("\n")
    return [json.loads(x) for x in text.splitlines()]


def test_a_batch_runs_to_its_output_and_error_files(live: LiveServer, key: str, tmp_path: Path,
                                                    engine: ScriptedEngine) -> None:
    client = sdk(live, key)
    good = [line(f"request-{i}", f"question {i}") for i in range(1, 6)]
    bad = [
        {"custom_id": "no-body", "method": "POST", "url": "/v4/chat/completions"},
        line("request-2"),  # the same custom_id as line 2
        line("wrong-url", url="/v4/embeddings"),
        line("long", "x" * 5000),  # over the server's 4 KB request body limit
        {**line("bad-temperature"), "body": {"model": "glm-4", "messages": [], "temperature": 7}},
        line("no-model", model="nobody-serves-this"),
        {**line("get"), "method": "GET"},
    ]
    file_id = upload(client, tmp_path, jsonl(*good[:2], bad[0], *good[2:], *bad[1:]))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v4/chat/completions",
                                  metadata={"description": "sentiment"}, completion_window="24h")
    assert batch.status in ("validating", "in_progress") and batch.object == "batch"
    assert batch.metadata == {"description": "sentiment"} and batch.input_file_id == file_id
    done = finished(client, batch.id)
    assert done.request_counts.total == 12
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 7)
    assert done.completed_at >= done.in_progress_at >= done.created_at and done.finalizing_at

    output = records(client, done.output_file_id)
    assert [r["custom_id"] for r in output] == [f"request-{i}" for i in range(1, 6)]  # input order
    for r in output:
        assert r["id"] == batch.id and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        assert body["choices"][0]["message"]["content"] == "Hello there!"
        assert body["request_id"] == f"{batch.id}-{r['custom_id']}" and body["usage"]["total_tokens"] > 0
    errors = {r["custom_id"]: r["response"] for r in records(client, done.error_file_id)}
    assert set(errors) == {"no-body", "request-2", "wrong-url", "long", "bad-temperature", "no-model", "get"}
    codes = {cid: (e["status_code"], e["body"]["error"]["code"]) for cid, e in errors.items()}
    assert codes["request-2"] == (400, "1214") and "repeats line 2" in errors["request-2"]["body"]["error"]["message"]
    assert codes["wrong-url"] == codes["get"] == codes["bad-temperature"] == (400, "1214")
    assert codes["long"] == (413, "1210") and codes["no-model"] == (400, "1211") and codes["no-body"] == (400, "1214")
    assert len(engine.requests) == 5 and all(r.background for r in engine.requests)
    # auto_delete_input_file defaults to true: the input is gone once the batch completed
    with pytest.raises(zhipuai.APIStatusError):
        client.files.content(file_id)


def test_the_openai_sdk_and_embeddings_batches(store: Store, tmp_path: Path, key: str,
                                               bundled_embedder: Embedder) -> None:
    server = serve(store, tmp_path, ScriptedEngine(), bundled_embedder)
    try:
        client = openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0)
        lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                  "body": {"model": "embedding-2", "input": f"text {i}"}} for i in range(3)]
        path = tmp_path / "emb.jsonl"
        path.write_bytes(jsonl(*lines))
        uploaded = client.files.create(file=path.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                      completion_window="24h")
        done = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status == "completed" and b)
        assert done.request_counts.completed == 3 and done.error_file_id is None
        out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert [len(r["response"]["body"]["data"][0]["embedding"]) for r in out] == [1024] * 3
        page = client.batches.list(limit=1)
        assert [b.id for b in page.data] == [batch.id]
    finally:
        server.stop()


def test_listing_is_paged_newest_first_and_keys_do_not_see_each_other(live: LiveServer, store: Store, key: str,
                                                                     tmp_path: Path) -> None:
    client = sdk(live, key)
    made = [client.batches.create(input_file_id=upload(client, tmp_path, jsonl(line("a"))),
                                  endpoint="/v4/chat/completions").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[:0:-1] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == made[:1] and not rest.has_more
    other = sdk(live, store.keys.create("other")[1])
    assert other.batches.list().data == []
    with pytest.raises(zhipuai.APIStatusError) as missing:
        other.batches.retrieve(made[0])
    assert missing.value.status_code == 404
    with pytest.raises(zhipuai.APIStatusError) as not_batch:
        other.batches.create(input_file_id="file-nope", endpoint="/v4/chat/completions")
    assert not_batch.value.status_code == 404


def test_cancel_stops_the_lines_in_flight_and_keeps_what_is_done(store: Store, tmp_path: Path, key: str) -> None:
    engine = HeldEngine(free=2)
    server = serve(store, tmp_path, engine, batch_concurrency=3, batch_prefetch=0)
    try:
        client = sdk(server, key)
        file_id = upload(client, tmp_path, jsonl(*(line(f"r{i}") for i in range(8))))
        batch = client.batches.create(input_file_id=file_id, endpoint="/v4/chat/completions")
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed == 2 and engine.held == 3)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = finished(client, batch.id, "cancelled")
        assert done.cancelled_at and done.request_counts.completed == 2 and done.request_counts.failed == 0
        assert engine.held == 0 and engine.calls == 5  # the three held lines were aborted, no new ones
        assert [r["custom_id"] for r in records(client, done.output_file_id)] == ["r0", "r1"]
        client.files.content(file_id)  # a cancelled batch keeps its input file
        assert client.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing
    finally:
        server.stop()


def test_a_batch_left_by_a_dead_server_resumes_and_writes_every_line_once(store: Store, tmp_path: Path,
                                                                         key: str) -> None:
    """What kill -9 leaves: a batch in progress, some lines written, leased to a process that is gone. The
    next server takes it over at once and runs only the lines not written."""
    engine = HeldEngine(free=0)
    first = serve(store, tmp_path, engine, batch_concurrency=2, batch_prefetch=0)
    client = sdk(first, key)
    file_id = upload(client, tmp_path, jsonl(*(line(f"r{i}") for i in range(6))))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v4/chat/completions")
    wait_for(lambda: engine.held == 2)
    # the dead server wrote two lines before it died (with the record a finished line gets)...
    for number in (1, 4):
        record = {"response": {"status_code": 200, "body": {"note": "from the dead server"}},
                  "custom_id": f"r{number - 1}", "id": batch.id}
        assert store.batches.record_line(batch.id, number, True, record)
        assert not store.batches.record_line(batch.id, number, True, record)  # a line is written once
    first.stop()
    # ...and its lease names a process of this machine that no longer exists
    dead = owner_tag().split(":")
    dead[1] = "999999999"
    with store._db.write() as conn:  # the test plays the dead server
        from sqlalchemy import update

        from glmstack.store.tables import batches

        conn.execute(update(batches).where(batches.c.id == batch.id).values(lease_owner=":".join(dead)))
    second_engine = ScriptedEngine()
    second = serve(store, tmp_path, second_engine)
    try:
        client = sdk(second, key)
        done = finished(client, batch.id)
        assert (done.request_counts.total, done.request_counts.completed) == (6, 6)
        output = records(client, done.output_file_id)
        assert [r["custom_id"] for r in output] == [f"r{i}" for i in range(6)]
        assert [r["response"]["body"].get("note") for r in output].count("from the dead server") == 2
        assert len(second_engine.requests) == 4  # only the lines not written ran again
    finally:
        second.stop()


def test_a_batch_past_its_window_expires_and_keeps_what_is_done(store: Store, tmp_path: Path, key: str) -> None:
    engine = HeldEngine(free=2)
    server = serve(store, tmp_path, engine, batch_concurrency=2, batch_prefetch=0, batch_window_s=2)
    try:
        client = sdk(server, key)
        batch = client.batches.create(input_file_id=upload(client, tmp_path, jsonl(*(line(f"r{i}") for i in range(6)))),
                                      endpoint="/v4/chat/completions")
        done = finished(client, batch.id, "expired")
        assert done.expired_at >= done.expires_at and done.request_counts.completed == 2
        assert [r["custom_id"] for r in records(client, done.output_file_id)] == ["r0", "r1"]
        assert engine.held == 0
    finally:
        server.stop()
