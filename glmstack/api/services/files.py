"""The files API's work (spec §2.10, §4.1): purposes and their caps, checking an upload before it is kept,
listing, reading back and deleting. Retrieval uploads become knowledge documents (services/documents.py).

An upload is checked completely - JSONL line by line, file-extract text extracted - while it is still a
staging file; only a good one is moved into the blob store and given a row, so a refused upload leaves
nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import PurePath
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.files import ExtractedContent, FileDeleted, FileList, FileObject
from glmstack.api.uploads import CapFor, StagedUpload, UploadForm, receive_upload
from glmstack.knowledge.jsonl_checks import JsonlError, check_batch, check_fine_tune
from glmstack.store.files import FileRecord, NewFile

log = logging.getLogger(__name__)

_MiB = 1024 * 1024
# The documented caps (spec §4.1); Settings.max_upload_bytes lowers them all.
PURPOSE_CAPS = {"fine-tune": 100 * _MiB, "batch": 100 * _MiB, "file-extract": 50 * _MiB, "retrieval": 50 * _MiB}
IMAGE_CAP = 5 * _MiB  # file-extract images
# How many uploaded files of a purpose one key may keep (spec §4.1: "每个用户最多可以上传100个文件" for
# file-extract, "文件总数不超过1000个" for batch); None: no count cap.
MAX_FILES_PER_KEY: dict[str, int | None] = {"file-extract": 100, "batch": 1000, "fine-tune": None}
# file-extract formats: the documented list plus plain text and Markdown.
EXTRACT_SUFFIXES = frozenset({".pdf", ".docx", ".doc", ".xls", ".xlsx", ".ppt", ".pptx", ".png", ".jpg",
                              ".jpeg", ".csv", ".txt", ".md"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
JSONL_TYPE = "application/jsonl"
# GET /files without a purpose lists these; retrieval files are documents, listed per knowledge base.
RETRIEVAL = "retrieval"


def _suffix(filename: str | None) -> str:
    return PurePath(filename or "").suffix.lower()


def caps(max_upload_bytes: int | None) -> tuple[CapFor, int]:
    """The upload cap rule for uploads.receive_upload, and the largest cap of any purpose."""

    def lowered(cap: int) -> int:
        return min(cap, max_upload_bytes) if max_upload_bytes is not None else cap

    def cap_for(purpose: str | None, filename: str | None) -> int:
        if purpose is None:
            return lowered(max(PURPOSE_CAPS.values()))
        if purpose not in PURPOSE_CAPS:
            raise PlatformError(1214, f"purpose must be one of {', '.join(PURPOSE_CAPS)}", field="purpose")
        if purpose == "file-extract" and _suffix(filename) in IMAGE_SUFFIXES:
            return lowered(IMAGE_CAP)
        return lowered(PURPOSE_CAPS[purpose])

    return cap_for, cap_for(None, None)


def file_object(record: FileRecord) -> FileObject:
    return FileObject(id=record.id, bytes=record.bytes, created_at=int(record.created_at.timestamp()),
                      filename=record.filename, purpose=record.purpose, status=record.status,
                      status_details=record.status_details)


def not_found(file_id: str) -> PlatformError:
    return PlatformError(1214, f"no file {file_id!r}", http_status=404, field="file_id")


def _count_refusal(purpose: str, most: int) -> PlatformError:
    return PlatformError(1210, f"this key already keeps {most} {purpose} files, the most it may; "
                               "delete some first")


async def upload(platform: Platform, caller: Caller, request: Request) -> dict[str, Any]:
    cap_for, largest = caps(platform.settings.max_upload_bytes)
    form = await receive_upload(request, platform.store.blobs, cap_for, largest)
    if form.purpose == RETRIEVAL:
        from glmstack.api.services import documents  # the knowledge side; it takes the staged file over

        return await documents.upload(platform, caller, form.knowledge_id, form.file, form.custom_separator,
                                      form.sentence_size)
    try:
        record = await _keep(platform, caller, form)
    finally:
        form.file.path.unlink(missing_ok=True)  # gone already when kept: adopt() moved it
    return file_object(record).model_dump()


async def _keep(platform: Platform, caller: Caller, form: UploadForm) -> FileRecord:
    store, staged, purpose = platform.store, form.file, form.purpose
    most = MAX_FILES_PER_KEY.get(purpose)
    if most is not None and await run_in_threadpool(store.files.count, caller.key_id, purpose) >= most:
        raise _count_refusal(purpose, most)  # before the checks below, which can take a while
    if purpose == "file-extract":
        new = await _extracted(staged)
    else:
        await run_in_threadpool(_check_jsonl, staged, purpose)
        new = NewFile(purpose=purpose, filename=staged.filename, bytes=staged.size, blob="",
                      file_type=JSONL_TYPE)
    blob = await run_in_threadpool(store.blobs.adopt, staged.path)
    try:
        record = await run_in_threadpool(
            lambda: store.files.create(caller.key_id, dataclasses.replace(new, blob=blob), max_count=most))
    except BaseException:
        store.blobs.delete(blob)  # in place (one unlink): awaiting here could be cancelled in turn
        raise
    if record is None:
        store.blobs.delete(blob)
        raise _count_refusal(purpose, most or 0)
    return record


def _check_jsonl(staged: StagedUpload, purpose: str) -> None:
    check = check_batch if purpose == "batch" else check_fine_tune
    try:
        with staged.path.open("rb") as stream:
            check(stream)
    except JsonlError as e:
        raise PlatformError(1214, str(e), field="file") from None


async def _extracted(staged: StagedUpload) -> NewFile:
    if _suffix(staged.filename) not in EXTRACT_SUFFIXES:
        formats = ", ".join(sorted(s[1:].upper() for s in EXTRACT_SUFFIXES))
        raise PlatformError(1214, f"file-extract takes {formats} files", field="file")
    from glmstack.knowledge.extraction import ExtractionError, extract

    try:
        extracted = await run_in_threadpool(extract, staged.path, staged.filename)
    except ExtractionError as e:
        raise PlatformError(1214, e.message, field="file") from None
    return NewFile(purpose="file-extract", filename=staged.filename, bytes=staged.size, blob="",
                   file_type=extracted.file_type, content=extracted.text, title=extracted.title or "")


async def list_files(platform: Platform, caller: Caller, *, purpose: str | None, knowledge_id: str | None,
                     page: int, limit: int, after: str | None, order: str) -> dict[str, Any]:
    if purpose == RETRIEVAL or (purpose is None and knowledge_id):
        from glmstack.api.services import documents

        return await documents.list_for_files(platform, caller, knowledge_id, page, limit, order)
    if purpose is not None and purpose not in PURPOSE_CAPS:
        raise PlatformError(1214, f"purpose must be one of {', '.join(PURPOSE_CAPS)}", field="purpose")
    files = platform.store.files
    cursor = None
    if after is not None:
        cursor = await run_in_threadpool(files.get, caller.key_id, after)
        if cursor is None:
            raise PlatformError(1214, f"no file {after!r} to list after", field="after")
    records, has_more = await run_in_threadpool(
        lambda: files.list(caller.key_id, purpose=purpose, after=cursor, offset=(page - 1) * limit,
                           limit=limit, descending=order == "desc", exclude_purposes=(RETRIEVAL,)))
    return FileList(data=[file_object(r) for r in records], has_more=has_more).model_dump()


async def delete(platform: Platform, caller: Caller, file_id: str) -> dict[str, Any]:
    store = platform.store
    record = await run_in_threadpool(store.files.delete, caller.key_id, file_id)
    if record is not None:
        # After the row: a blob whose delete fails is an orphan, swept at the next start.
        await run_in_threadpool(store.blobs.delete, record.blob)
        return FileDeleted(id=file_id).model_dump()
    from glmstack.api.services import documents  # DELETE /files/{id} deletes documents too (spec §2.10.3)

    if await documents.delete(platform, caller, file_id):
        return FileDeleted(id=file_id).model_dump()
    raise not_found(file_id)


async def content(platform: Platform, caller: Caller, file_id: str) -> Response:
    """file-extract: the extraction as JSON; batch and fine-tune files: the bytes (spec §9.4 item 47)."""
    store = platform.store
    record = await run_in_threadpool(store.files.get, caller.key_id, file_id)
    if record is None:
        raise not_found(file_id)
    if record.purpose == "file-extract":
        text = await run_in_threadpool(store.files.content, caller.key_id, file_id)
        body = ExtractedContent(content=text or "", file_type=record.file_type, filename=record.filename,
                                title=record.title or "")
        return JSONResponse(body.model_dump())
    path = store.blobs.path(record.blob)
    if not path.exists():
        log.error("file %s has no blob on disk (%s)", record.id, path)
        raise PlatformError(500, "the file's bytes are missing on the server")
    return FileResponse(path, media_type=record.file_type or "application/octet-stream",
                        filename=record.filename, content_disposition_type="attachment")
