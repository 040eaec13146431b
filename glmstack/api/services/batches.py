"""Batches (spec §2.9) and async chat (§2.3-2.4): the rows the job runner (jobs/runner.py) works from.

Creating either only writes a row and wakes the runner; everything that can be refused before work starts
(an unknown file, a bad parameter, an unknown model, unsafe input) is refused here, as the sync call would.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.batches import (
    AsyncTaskStatus,
    Batch,
    BatchCreate,
    BatchErrors,
    BatchList,
    RequestCounts,
)
from glmstack.api.schemas.chat import ChatCompletionRequest
from glmstack.api.services import chat
from glmstack.store.async_tasks import AsyncTask
from glmstack.store.batches import BatchRecord
from glmstack.store.blobs import BlobStore

DEFAULT_WINDOW = "24h"


def batch_object(record: BatchRecord) -> Batch:
    fields = {name: getattr(record, name) for name in (
        "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
        "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
        "cancelling_at", "cancelled_at", "metadata")}
    return Batch(**fields, request_counts=RequestCounts(total=record.request_total,
                                                        completed=record.request_completed,
                                                        failed=record.request_failed),
                 errors=BatchErrors.model_validate({"data": record.errors}) if record.errors else None)


def _not_found(batch_id: str) -> PlatformError:
    return PlatformError(1214, f"no batch {batch_id!r}", http_status=404, field="batch_id")


def _link_copy(blobs: BlobStore, blob: str) -> str:
    """The batch's own name for its input's bytes: a hard link (no copy), so deleting the input file while
    the batch runs takes nothing from it. A copy where the file system has no hard links."""
    staged = blobs.staging_path()
    try:
        os.link(blobs.path(blob), staged)
    except OSError:
        shutil.copyfile(blobs.path(blob), staged)
    return blobs.adopt(staged)


async def create(platform: Platform, caller: Caller, body: BatchCreate) -> Batch:
    store = platform.store
    record = await run_in_threadpool(store.files.get, caller.key_id, body.input_file_id)
    if record is None or record.purpose != "batch":
        raise PlatformError(1214, f"no file {body.input_file_id!r} with purpose batch",
                            http_status=404 if record is None else 400, field="input_file_id")
    blob = await run_in_threadpool(_link_copy, store.blobs, record.blob)
    try:
        batch = await run_in_threadpool(lambda: store.batches.create(
            caller.key_id, endpoint=body.endpoint, input_file_id=record.id, input_blob=blob,
            completion_window=body.completion_window or DEFAULT_WINDOW, metadata=body.metadata,
            auto_delete_input_file=body.auto_delete_input_file is not False,
            window_s=platform.settings.batch_window_s))
    except BaseException:
        store.blobs.delete(blob)
        raise
    platform.jobs.wake()
    return batch_object(batch)


async def retrieve(platform: Platform, caller: Caller, batch_id: str) -> Batch:
    record = await run_in_threadpool(platform.store.batches.get, caller.key_id, batch_id)
    if record is None:
        raise _not_found(batch_id)
    return batch_object(record)


async def list_batches(platform: Platform, caller: Caller, *, after: str | None, limit: int) -> BatchList:
    batches = platform.store.batches
    cursor = None
    if after is not None:
        cursor = await run_in_threadpool(batches.get, caller.key_id, after)
        if cursor is None:
            raise PlatformError(1214, f"no batch {after!r} to list after", field="after")
    records, has_more = await run_in_threadpool(lambda: batches.list(caller.key_id, after=cursor, limit=limit))
    data = [batch_object(r) for r in records]
    return BatchList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                     last_id=data[-1].id if data else None)


async def cancel(platform: Platform, caller: Caller, batch_id: str) -> Batch:
    record = await run_in_threadpool(platform.store.batches.request_cancel, caller.key_id, batch_id)
    if record is None:
        raise _not_found(batch_id)
    if record.status == "cancelling":
        platform.jobs.cancel_batch(batch_id)
    return batch_object(record)


# ---- async chat -------------------------------------------------------------------------------------------

async def submit_chat(platform: Platform, caller: Caller, body: ChatCompletionRequest) -> AsyncTaskStatus:
    if body.stream:
        raise PlatformError(1214, "an async call cannot stream: poll GET /async-result/{id}", field="stream")
    chat.prepare(platform, caller, body, "check")  # model, parameters, input safety: refused now, as sync would
    if body.request_id is not None and "\x00" in body.request_id:  # a database text column cannot hold it
        raise PlatformError(1214, "request_id contains a NUL character", field="request_id")
    sent: dict[str, Any] = body.model_dump(mode="json", exclude_unset=True)
    task = await run_in_threadpool(lambda: platform.store.async_tasks.create(
        caller.key_id, request_id=body.request_id, model=body.model, body=sent))
    platform.jobs.wake()
    return task_status(task)


def task_status(task: AsyncTask) -> AsyncTaskStatus:
    status = AsyncTaskStatus(id=task.id, request_id=task.request_id, model=task.model,
                             task_status=task.status)  # type: ignore[arg-type]
    result = task.result or {}
    if task.status == "SUCCESS":
        status.choices, status.usage = result.get("choices"), result.get("usage")
        status.created, status.retrieval = result.get("created"), result.get("retrieval")
    elif task.status == "FAIL":
        status.error = result.get("error")
    return status


async def result(platform: Platform, caller: Caller, task_id: str) -> AsyncTaskStatus:
    task = await run_in_threadpool(platform.store.async_tasks.get, caller.key_id, task_id)
    if task is None:
        raise PlatformError(1233, http_status=404, task_id=task_id[:64])
    return task_status(task)
