"""multipart/form-data uploads, streamed: the `file` part goes straight from the socket to a staging file
under a byte cap, the small fields are collected under caps of their own, and nothing of the body is held in
memory beyond one chunk.

The cap is decided while the body arrives: the largest of any purpose until the `purpose` field has been
read (the SDKs send it before `file`), then that purpose's (for file-extract, also the file's type: images are
capped lower). Going over it ends the request at once with HTTP 435; every failure removes the staging file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from glmstack.api.errors import PlatformError
from glmstack.store.blobs import BlobStore, display_name

# Room for everything around the file: part headers, the small fields, boundaries.
FORM_OVERHEAD_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024  # one small field (a custom separator, a knowledge id)
MAX_PARTS = 64
FIELDS = frozenset({"purpose", "knowledge_id", "sentence_size", "custom_separator", "custom_separator[]",
                    "upload_detail"})

# (purpose or None while unknown, display filename or None while unknown) -> the byte cap for the file; raises
# PlatformError for a purpose that does not exist.
CapFor = Callable[[str | None, str | None], int]


@dataclass(frozen=True)
class StagedUpload:
    """An uploaded file, whole, in a staging file (the receiver's to adopt into the blob store or delete)."""

    path: Path
    filename: str  # display name only (blobs.display_name): never a path
    size: int
    content_type: str  # as the client labelled the part; not trusted for anything


@dataclass
class UploadForm:
    purpose: str
    file: StagedUpload
    knowledge_id: str | None = None
    sentence_size: int | None = None
    custom_separator: list[str] | None = None


def size_text(n: int) -> str:
    """100 MiB -> "100MB", as the platform's message writes it."""
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def too_large(cap: int, purpose: str | None) -> PlatformError:
    what = f"the cap for purpose {purpose}" if purpose else "the largest upload accepted"
    return PlatformError(435, f"the file is larger than {cap} bytes, {what}", limit=size_text(cap))


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    content_type: str = ""
    data: bytearray = field(default_factory=bytearray)


class _FormReader:
    """python-multipart's callbacks: routes each part's bytes to the staging file or a field buffer. The
    callbacks run inside parser.write(); file bytes are queued there and written by `receive` between chunks,
    in a worker thread."""

    def __init__(self, staging: Path, cap_for: CapFor, largest_cap: int) -> None:
        self.staging, self.cap_for = staging, cap_for
        self.cap = largest_cap
        self.fields: dict[str, list[str]] = {}
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.parts = 0
        self.file: BinaryIO | None = None
        self.in_file = False
        self.file_done = False
        self.file_size = 0
        self.file_name = ""
        self.file_type = ""
        self.pending: list[bytes] = []
        self.ended = False

    @property
    def purpose(self) -> str | None:
        values = self.fields.get("purpose")
        return values[-1] if values else None

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise PlatformError(1210, f"the form has more than {MAX_PARTS} parts")
        self.part, self.headers = _Part(), {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_name.strip().lower()] = self.header_value.strip()
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise PlatformError(1210, 'a form part has no Content-Disposition name')
        self.part.name = options[b"name"].decode("utf-8", errors="replace")
        if b"filename" in options:
            self.part.filename = options[b"filename"].decode("utf-8", errors="replace")
        self.part.content_type = self.headers.get(b"content-type", b"").decode("latin-1")
        if self.part.name != "file":
            return
        if self.file is not None:
            raise PlatformError(1214, "send one file per upload", field="file")
        self.file_name = display_name(self.part.filename or "")
        self.file_type = self.part.content_type
        self.cap = self.cap_for(self.purpose, self.file_name)
        self.file = self.staging.open("xb")
        self.in_file = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.file_size += end - start
            if self.file_size > self.cap:
                raise too_large(self.cap, self.purpose)
            self.pending.append(data[start:end])
            return
        if len(self.part.data) + end - start > MAX_FIELD_BYTES:
            raise PlatformError(1214, f"the field is longer than {MAX_FIELD_BYTES} bytes", field=self.part.name)
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        if self.in_file:
            self.in_file, self.file_done = False, True
            return
        name = self.part.name
        if name not in FIELDS:
            return  # a field of some newer SDK: read (under the field cap) and ignored
        try:
            value = self.part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise PlatformError(1214, "the field is not UTF-8 text", field=name) from None
        self.fields.setdefault(name, []).append(value)
        if name == "purpose":
            self.cap_for(value, None)  # an unknown purpose ends the upload before the file is read

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {name: getattr(self, name) for name in (
            "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
            "on_part_data", "on_part_end", "on_end")}


def _boundary(request: Request) -> bytes:
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise PlatformError(1210, "an upload is a multipart/form-data body with a boundary")
    return boundary


def _check_declared_length(request: Request, largest_cap: int) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > largest_cap + FORM_OVERHEAD_BYTES:
        raise too_large(largest_cap, None)


async def receive_upload(request: Request, blobs: BlobStore, cap_for: CapFor, largest_cap: int) -> UploadForm:
    """Reads a multipart upload; the file ends up in a staging file that the caller must adopt or delete.
    Raises PlatformError (and leaves nothing on disk) for anything wrong with the form."""
    boundary = _boundary(request)
    _check_declared_length(request, largest_cap)
    reader = _FormReader(blobs.staging_path(), cap_for, largest_cap)
    try:
        parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
        body_cap, seen = largest_cap + FORM_OVERHEAD_BYTES, 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > body_cap:  # bytes around the parts (a preamble, an endless epilogue) count too
                raise too_large(largest_cap, reader.purpose)
            parser.write(chunk)
            if reader.pending:
                data, reader.pending = b"".join(reader.pending), []
                await run_in_threadpool(reader.file.write, data)  # type: ignore[union-attr]
        parser.finalize()
        if not reader.ended:
            raise PlatformError(1210, "the multipart body ends before its closing boundary")
        form = _form(reader)
    except FormParserError as e:
        _discard(reader)
        raise PlatformError(1210, f"malformed multipart body: {e}") from None
    except BaseException:
        _discard(reader)
        raise
    if reader.file is not None:
        reader.file.close()
    return form


def _discard(reader: _FormReader) -> None:
    if reader.file is not None:
        reader.file.close()
    reader.staging.unlink(missing_ok=True)


def _one(reader: _FormReader, name: str) -> str | None:
    values = reader.fields.get(name)
    if values and len(values) > 1:
        raise PlatformError(1214, "the field is sent more than once", field=name)
    return values[0] if values else None


def _form(reader: _FormReader) -> UploadForm:
    if not reader.file_done:
        raise PlatformError(1213, "the upload has no `file` part", field="file")
    purpose = _one(reader, "purpose")
    if not purpose:
        raise PlatformError(1213, "purpose is required", field="purpose")
    cap = reader.cap_for(purpose, reader.file_name)  # the purpose may have come after the file
    if reader.file_size > cap:
        raise too_large(cap, purpose)
    if reader.file_size == 0:
        raise PlatformError(1214, "the file is empty", field="file")
    if reader.fields.get("upload_detail"):
        raise PlatformError(1214, "importing documents by URL is not supported; upload the file",
                            field="upload_detail")
    sentence_size = _one(reader, "sentence_size")
    if sentence_size is not None:
        try:
            parsed_size: int | None = int(sentence_size)
        except ValueError:
            raise PlatformError(1214, "sentence_size must be an integer", field="sentence_size") from None
    else:
        parsed_size = None
    separators = reader.fields.get("custom_separator[]", []) + reader.fields.get("custom_separator", [])
    staged = StagedUpload(reader.staging, reader.file_name, reader.file_size, reader.file_type)
    return UploadForm(purpose=purpose, file=staged, knowledge_id=_one(reader, "knowledge_id") or None,
                      sentence_size=parsed_size, custom_separator=separators or None)
