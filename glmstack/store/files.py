"""Rows of the `files` table: uploaded (and, for batches, generated) files of every purpose but retrieval,
which become knowledge documents instead.

Ids are "file-" and 24 random hex digits: opaque, unguessable (so one key cannot probe for another's files)
and short enough for the platform's id columns. Every read takes the owner, and a row of another key is
reported exactly like a missing one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Row, Select, and_, delete, func, insert, or_, select
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store.db import Database
from glmstack.store.ids import plausible_id
from glmstack.store.tables import files

ID_PREFIX = "file-"
MAX_ID_LENGTH = 40  # tables.files.id


@dataclass(frozen=True)
class FileRecord:
    id: str
    key_id: str | None
    purpose: str
    filename: str
    bytes: int
    created_at: datetime
    status: str
    status_details: str | None
    blob: str
    file_type: str
    title: str | None
    generated: bool


@dataclass(frozen=True)
class NewFile:
    """What an upload knows before it has an id."""

    purpose: str
    filename: str
    bytes: int
    blob: str
    file_type: str = ""
    content: str | None = None  # file-extract: the extracted text
    title: str | None = None
    generated: bool = False


def new_file_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # SQLite returns naive UTC


_COLUMNS = (files.c.id, files.c.key_id, files.c.purpose, files.c.filename, files.c.bytes, files.c.created_at,
            files.c.status, files.c.status_details, files.c.blob, files.c.file_type, files.c.title,
            files.c.generated)


def _record(row: Row) -> FileRecord:
    return FileRecord(id=row.id, key_id=row.key_id, purpose=row.purpose, filename=row.filename,
                      bytes=row.bytes, created_at=_utc(row.created_at), status=row.status,
                      status_details=row.status_details, blob=row.blob, file_type=row.file_type,
                      title=row.title, generated=bool(row.generated))


def _owned_by(key_id: str | None) -> ColumnElement[bool]:
    return files.c.key_id.is_(None) if key_id is None else files.c.key_id == key_id


def _count(owner: str | None, purpose: str) -> Select[int]:
    return select(func.count()).select_from(files).where(
        _owned_by(owner), files.c.purpose == purpose, files.c.generated.is_(False))


class FileStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, owner: str | None, new: NewFile, *, max_count: int | None = None,
               file_id: str | None = None) -> FileRecord | None:
        """Inserts a row and returns it; None when `owner` already has `max_count` uploaded (not generated)
        files of this purpose. The count is taken in the same transaction as the insert (serialized on
        SQLite; on PostgreSQL two uploads racing for the last place may both get it). `file_id`: a chosen id
        (a batch's output file, written again after a crash): when that file exists already, it is returned
        as it is."""
        if file_id is not None and (existing := self.get(owner, file_id)) is not None:
            return existing
        record = FileRecord(id=file_id or new_file_id(), key_id=owner, purpose=new.purpose, filename=new.filename,
                            bytes=new.bytes, created_at=datetime.now(UTC), status="processed",
                            status_details=None, blob=new.blob, file_type=new.file_type, title=new.title,
                            generated=new.generated)
        with self._db.write() as conn:
            if max_count is not None and conn.execute(_count(owner, new.purpose)).scalar_one() >= max_count:
                return None
            conn.execute(insert(files).values(
                id=record.id, key_id=owner, purpose=new.purpose, filename=new.filename, bytes=new.bytes,
                created_at=record.created_at, status=record.status, status_details=None, blob=new.blob,
                file_type=new.file_type, content=new.content, title=new.title, generated=new.generated,
            ))
        return record

    def count(self, owner: str | None, purpose: str) -> int:
        """How many files of this purpose `owner` uploaded (generated ones not counted)."""
        with self._db.read() as conn:
            return conn.execute(_count(owner, purpose)).scalar_one()

    def get(self, owner: str | None, file_id: str) -> FileRecord | None:
        if not plausible_id(file_id):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(*_COLUMNS).where(files.c.id == file_id, _owned_by(owner))).first()
        return _record(row) if row is not None else None

    def content(self, owner: str | None, file_id: str) -> str | None:
        """The extracted text of a file-extract file (None: no such file, or no text)."""
        if not plausible_id(file_id):
            return None
        with self._db.read() as conn:
            return conn.execute(select(files.c.content)
                                .where(files.c.id == file_id, _owned_by(owner))).scalar()

    def list(self, owner: str | None, *, purpose: str | None, after: FileRecord | None = None,
             offset: int = 0, limit: int = 10, descending: bool = True,
             exclude_purposes: tuple[str, ...] = ()) -> tuple[list[FileRecord], bool]:
        """One page of the owner's files, newest first unless `descending` is False: those after the file
        `after` in that order (a cursor that stays right while files are added), skipping `offset` more.
        Returns the page and whether more follow."""
        query = select(*_COLUMNS).where(_owned_by(owner))
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if exclude_purposes:
            query = query.where(files.c.purpose.not_in(exclude_purposes))
        # (created_at, id) orders ties within the same microsecond too, so a cursor never skips or repeats.
        if after is not None:
            at, after_id = after.created_at, after.id
            if descending:
                query = query.where(or_(files.c.created_at < at,
                                        and_(files.c.created_at == at, files.c.id < after_id)))
            else:
                query = query.where(or_(files.c.created_at > at,
                                        and_(files.c.created_at == at, files.c.id > after_id)))
        if descending:
            query = query.order_by(files.c.created_at.desc(), files.c.id.desc())
        else:
            query = query.order_by(files.c.created_at, files.c.id)
        with self._db.read() as conn:
            rows = conn.execute(query.offset(offset).limit(limit + 1)).all()
        return [_record(row) for row in rows[:limit]], len(rows) > limit

    def delete(self, owner: str | None, file_id: str) -> FileRecord | None:
        """Removes the row and returns it (its blob is the caller's to delete); None if there was none."""
        if not plausible_id(file_id):
            return None
        with self._db.write() as conn:
            row = conn.execute(select(*_COLUMNS).where(files.c.id == file_id, _owned_by(owner))).first()
            if row is None:
                return None
            conn.execute(delete(files).where(files.c.id == file_id))
        return _record(row)

    def blobs(self) -> set[str]:
        """Every blob a file row names (for the orphan sweep)."""
        with self._db.read() as conn:
            return set(conn.execute(select(files.c.blob)).scalars())
