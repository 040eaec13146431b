"""One batch (spec §2.9), from `validating` to its last state, under this server's lease.

Lines are read from the batch's own copy of its input (a hard link made at creation, so deleting the input
file does not pull it away), checked one by one - a line that cannot run goes to the error file with the code
the endpoint would answer, and the rest proceed - and run as background requests, `slots` at a time across
all jobs. Each finished line is written to `batch_lines` at once, so whatever stops the batch (a cancel, the
window running out, a shutdown, kill -9) loses at most the lines in flight, which a resumed run does again.

The output and error files are written when every line is done: temp file, fsync, rename into the blob store,
then the file row under an id derived from the batch (a crash between two of these steps writes the same
file again, never a second one).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.durable import fsync_directory
from glmstack.jobs import requests
from glmstack.knowledge.jsonl_checks import BATCH_URLS, MAX_LINE_BYTES
from glmstack.store.batches import CANCELLABLE, BatchRecord
from glmstack.store.files import NewFile

log = logging.getLogger(__name__)

MAX_CUSTOM_ID_CHARS = 256


class StopBatch(Exception):
    """Why a batch stops before its lines are done: "cancelled", "expired", or None for "leave it for later"
    (shutdown, lease lost) - then nothing is finalized and a later run resumes it."""

    def __init__(self, final_status: str | None) -> None:
        super().__init__(final_status or "paused")
        self.final_status = final_status


def endpoint_name(endpoint: str) -> str:
    """"/v4/chat/completions" (or /v1/..., /api/paas/v4/...) -> "chat/completions"."""
    return BATCH_URLS[endpoint]


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for each non-blank line; a line over MAX_LINE_BYTES comes back cut
    (its check refuses it)."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # skip the remainder of the over-long line
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.strip():
                yield number, raw


def output_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


class BatchRun:
    def __init__(self, platform: Platform, batch: BatchRecord, slots: asyncio.Semaphore) -> None:
        self.platform, self.batch, self.slots = platform, batch, slots
        self.store = platform.store.batches
        self.caller = requests.caller_for(batch.key_id)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stop: StopBatch | None = None
        self._gentle = False  # stop taking lines, let those in flight finish (a shutdown's grace period)

    # ---- control (from the runner: heartbeat, cancel route, shutdown) -------------------------------------

    def stop(self, final_status: str | None) -> None:
        """Stops now: lines in flight are aborted in the engine (within a step) and not written."""
        if self._stop is None or final_status is not None:
            self._stop = StopBatch(final_status)
        for task in list(self._in_flight):
            task.cancel()

    def stop_taking_lines(self) -> None:
        self._gentle = True

    # ---- the run ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        batch = self.batch
        if batch.expires_at is not None and time.time() > batch.expires_at and batch.status in CANCELLABLE:
            self._stop = StopBatch("expired")  # claimed after its window (the server was down): no more lines
            if batch.status == "validating":
                await asyncio.to_thread(self.store.start, batch.id, 0)
        if batch.status == "validating" and self._stop is None:
            await self._validate()
        if self._stop is None and await asyncio.to_thread(self.store_status) == "in_progress":
            await self._run_lines()
        status = await asyncio.to_thread(self.store_status)
        if self._stop is not None and self._stop.final_status is None:
            return  # shutdown or lease lost: resumed later
        if self._stop is not None and self._stop.final_status == "expired" and status == "in_progress":
            await asyncio.to_thread(self._finalize, "expired")
        elif status == "cancelling":
            await asyncio.to_thread(self._finalize, "cancelled")
        elif status in ("in_progress", "finalizing"):
            await asyncio.to_thread(self.store.set_status, batch.id, "finalizing", only_from=("in_progress",))
            await asyncio.to_thread(self._finalize, "completed")

    def store_status(self) -> str:
        record = self.store.get_any(self.batch.id)
        return record.status if record is not None else "missing"

    async def _validate(self) -> None:
        blob = self.batch.input_blob
        path = self.platform.store.blobs.path(blob) if blob else None
        if path is None or not path.exists():
            error = {"code": "1214", "line": None, "param": "input_file_id",
                     "message": "the batch's input file is gone"}
            await asyncio.to_thread(self.store.fail, self.batch.id, [error])
            return
        total = await asyncio.to_thread(lambda: sum(1 for _ in input_lines(path)))
        await asyncio.to_thread(self.store.start, self.batch.id, total)

    async def _run_lines(self) -> None:
        batch = self.batch
        assert batch.input_blob is not None
        path = self.platform.store.blobs.path(batch.input_blob)
        done = await asyncio.to_thread(self.store.done_lines, batch.id)
        seen: dict[str, int] = {}
        lines = input_lines(path)
        while self._stop is None and not self._gentle:
            item = await asyncio.to_thread(next, lines, None)
            if item is None:
                break
            number, raw = item
            parsed = self._check(number, raw, seen)
            if number in done:
                continue
            if isinstance(parsed, PlatformError):
                custom_id = _custom_id(raw)
                await asyncio.to_thread(self._write, number, custom_id, *requests.error_result(parsed))
                continue
            await self.slots.acquire()
            if self._stop is not None or self._gentle:
                self.slots.release()
                break
            task = asyncio.create_task(self._run_line(number, *parsed))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        while self._in_flight:  # the lines already started finish (or are cancelled by stop())
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    def _check(self, number: int, raw: bytes, seen: dict[str, int]) -> tuple[str, dict[str, Any]] | PlatformError:
        """(custom_id, body) of a line that can run, or the error its error-file line carries."""
        if len(raw) > min(MAX_LINE_BYTES, self.platform.settings.max_body_bytes):
            return PlatformError(1210, f"line {number} is longer than the request body limit", http_status=413)
        try:
            request = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return PlatformError(1210, f"line {number} is not valid JSON ({e})")
        if not isinstance(request, dict):
            return PlatformError(1210, f"line {number} is not a JSON object")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
            return PlatformError(1214, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters",
                                 field="custom_id")
        if custom_id in seen:
            return PlatformError(1214, f"custom_id {custom_id!r} repeats line {seen[custom_id]}",
                                 field="custom_id")
        seen[custom_id] = number
        if request.get("method") != "POST":
            return PlatformError(1214, 'method must be "POST"', field="method")
        url = request.get("url")
        if not isinstance(url, str) or BATCH_URLS.get(url) != endpoint_name(self.batch.endpoint):
            return PlatformError(1214, f"url must be the batch's endpoint {self.batch.endpoint}", field="url")
        body = request.get("body")
        if not isinstance(body, dict):
            return PlatformError(1214, "body must be a JSON object", field="body")
        return custom_id, body

    async def _run_line(self, number: int, custom_id: str, body: dict[str, Any]) -> None:
        held = True
        try:
            if endpoint_name(self.batch.endpoint) == "embeddings":
                status, response = await requests.run_embeddings(self.platform, self.caller, body)
            else:
                request_id = f"{self.batch.id}-{custom_id}"[:128]
                status, response = await requests.run_chat(self.platform, self.caller, body,
                                                           request_id=request_id)
            # The engine is done with this line: the next one starts while this one is written, so that it
            # reaches the engine's next step rather than the one after the database write.
            self.slots.release()
            held = False
            await asyncio.to_thread(self._write, number, custom_id, status, response)
        except asyncio.CancelledError:
            pass  # stopped: not written, so a resumed run does this line again
        except Exception:
            log.exception("batch %s line %d failed; it runs again when the batch resumes", self.batch.id, number)
            self.stop(None)
        finally:
            if held:
                self.slots.release()

    def _write(self, number: int, custom_id: str | None, status: int, body: dict[str, Any]) -> None:
        record = {"response": {"status_code": status, "body": body}, "custom_id": custom_id, "id": self.batch.id}
        self.store.record_line(self.batch.id, number, status == 200, record)

    # ---- the files ----------------------------------------------------------------------------------------

    def _finalize(self, final_status: str) -> None:
        batch, store = self.batch, self.platform.store
        output = self._write_file(True, "output")
        errors = self._write_file(False, "error")
        store.batches.finish(batch.id, final_status, output_file_id=output, error_file_id=errors)
        if batch.input_blob:
            store.blobs.delete(batch.input_blob)
        if final_status == "completed" and batch.auto_delete_input_file:
            deleted = store.files.delete(batch.key_id, batch.input_file_id)
            if deleted is not None:
                store.blobs.delete(deleted.blob)
        log.info("batch %s %s", batch.id, final_status)

    def _write_file(self, ok: bool, kind: str) -> str | None:
        """Writes the output (ok) or error records to a new file; its id, or None when there are none."""
        store, batch = self.platform.store, self.batch
        if store.batches.count_lines(batch.id, ok) == 0:
            return None
        file_id = output_file_id(batch.id, kind)
        if store.files.get(batch.key_id, file_id) is not None:
            return file_id  # written before a crash cut the finalization short
        staged = store.blobs.staging_path()
        size = 0
        with open(staged, "wb") as f:
            for record in store.batches.records(batch.id, ok):
                data = record.encode("utf-8") + b"\n"
                f.write(data)
                size += len(data)
            f.flush()
            os.fsync(f.fileno())
        blob = store.blobs.adopt(staged)  # one rename
        fsync_directory(store.blobs.root)
        store.files.create(batch.key_id, NewFile(purpose="batch", filename=f"{batch.id}_{kind}.jsonl", bytes=size,
                                                 blob=blob, file_type="application/jsonl", generated=True),
                           file_id=file_id)
        return file_id


def _custom_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
