"""Rows of `batches` (spec §2.9) and `batch_lines`, the finished lines of each.

A line's result is written once: `batch_lines` is keyed by (batch, line) and the insert does nothing when the
line is already there, in the same transaction that counts it. A line run again after a crash (its first run
was cut off before it was written) therefore lands in the output exactly once, and the counts stay true.
Reads take the owner; another key's batch is reported exactly like a missing one.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store import leases
from glmstack.store.db import Database
from glmstack.store.ids import plausible_id
from glmstack.store.tables import batch_lines, batches

ID_PREFIX = "batch_"
# What a runner still has to do something about: run lines, write the files, or wind a cancel down.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")
_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
_LINE_PAGE = 2000  # records read per query while an output file is written


@dataclass(frozen=True)
class BatchRecord:
    id: str
    key_id: str | None
    endpoint: str
    input_file_id: str
    input_blob: str | None
    completion_window: str
    metadata: dict[str, str] | None
    auto_delete_input_file: bool
    status: str
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    request_total: int
    request_completed: int
    request_failed: int
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    lease_owner: str | None
    lease_until: datetime | None


def _record(row: Row) -> BatchRecord:
    values = dict(row._mapping)
    values["metadata"] = json.loads(values["metadata"]) if values["metadata"] else None
    values["errors"] = json.loads(values["errors"]) if values["errors"] else None
    values["auto_delete_input_file"] = bool(values["auto_delete_input_file"])
    return BatchRecord(**values)


def _owned_by(key_id: str | None) -> ColumnElement[bool]:
    return batches.c.key_id.is_(None) if key_id is None else batches.c.key_id == key_id


def new_batch_id() -> str:
    """Ids sort in creation order (nanoseconds in hex, then random digits), so a listing ordered by id is
    newest first even for batches created within the same second."""
    return f"{ID_PREFIX}{time.time_ns():016x}{secrets.token_hex(4)}"


class BatchStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- the API's side ---------------------------------------------------------------------------------

    def create(self, owner: str | None, *, endpoint: str, input_file_id: str, input_blob: str,
               completion_window: str, metadata: dict[str, str] | None, auto_delete_input_file: bool,
               window_s: int) -> BatchRecord:
        now = int(time.time())
        values = dict(id=new_batch_id(), key_id=owner, endpoint=endpoint, input_file_id=input_file_id,
                      input_blob=input_blob, completion_window=completion_window,
                      metadata=json.dumps(metadata) if metadata is not None else None,
                      auto_delete_input_file=auto_delete_input_file, status="validating", created_at=now,
                      expires_at=now + window_s)
        with self._db.write() as conn:
            conn.execute(batches.insert().values(**values))
            row = conn.execute(select(batches).where(batches.c.id == values["id"])).one()
        return _record(row)

    def get(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        if not plausible_id(batch_id):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(batches).where(batches.c.id == batch_id, _owned_by(owner))).first()
        return _record(row) if row is not None else None

    def list(self, owner: str | None, *, after: BatchRecord | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """Newest first; `after`: the page after that batch (a cursor that holds while batches are added)."""
        query = select(batches).where(_owned_by(owner))
        if after is not None:
            query = query.where(batches.c.id < after.id)
        query = query.order_by(batches.c.id.desc()).limit(limit + 1)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, owner: str | None, batch_id: str) -> BatchRecord | None:
        """validating/in_progress -> cancelling (the runner winds it down); other states are left as they are.
        Returns the batch as it is now; None if there is no such batch."""
        if not plausible_id(batch_id):
            return None
        with self._db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id, _owned_by(owner),
                                               batches.c.status.in_(CANCELLABLE))
                         .values(status="cancelling", cancelling_at=int(time.time())))
            row = conn.execute(select(batches).where(batches.c.id == batch_id, _owned_by(owner))).first()
        return _record(row) if row is not None else None

    # ---- the runner's side ------------------------------------------------------------------------------

    def claim(self, me: str, lease_s: float) -> BatchRecord | None:
        """The oldest active batch nobody holds (or whose holder is gone), now leased to `me`."""
        row = leases.claim_first(self._db, batches, batches.c.status.in_(ACTIVE), [batches.c.id], me, lease_s)
        return _record(row) if row is not None else None

    def renew(self, batch_id: str, me: str, lease_s: float) -> str | None:
        """Extends the lease and returns the batch's status (a cancel is seen this way); None when the lease
        is no longer ours."""
        with self._db.write() as conn:
            if not leases.renew(conn, batches, batch_id, me, lease_s):
                return None
            return conn.execute(select(batches.c.status).where(batches.c.id == batch_id)).scalar_one()

    def release(self, batch_id: str, me: str) -> None:
        with self._db.write() as conn:
            leases.release(conn, batches, batch_id, me)

    def start(self, batch_id: str, total: int) -> None:
        """validating -> in_progress with the number of requests (a cancel that came first wins)."""
        with self._db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.status == "validating")
                         .values(status="in_progress", in_progress_at=int(time.time())))
            conn.execute(update(batches).where(batches.c.id == batch_id)
                         .values(request_total=total))

    def fail(self, batch_id: str, errors: Sequence[dict[str, Any]]) -> None:
        """The input could not be read at all: failed, with the reasons in `errors`."""
        with self._db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id).values(
                status="failed", failed_at=int(time.time()), errors=json.dumps(list(errors), ensure_ascii=False),
                lease_owner=None, lease_until=None))

    def done_lines(self, batch_id: str) -> set[int]:
        with self._db.read() as conn:
            return set(conn.execute(select(batch_lines.c.line).where(batch_lines.c.batch_id == batch_id))
                       .scalars())

    def record_line(self, batch_id: str, line: int, ok: bool, record: dict[str, Any]) -> bool:
        """Writes a finished line and counts it; False (and nothing counted) when it was already written."""
        text = json.dumps(record, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate the input spelled ("\ud800" in a custom_id): escaped
            text = json.dumps(record)
        insert = _INSERT[self._db.dialect](batch_lines).values(batch_id=batch_id, line=line, ok=ok, record=text)
        with self._db.write() as conn:
            # RETURNING says whether the row went in (rowcount is not reliable for ON CONFLICT on psycopg)
            written = conn.execute(insert.on_conflict_do_nothing()  # type: ignore[attr-defined]
                                   .returning(batch_lines.c.line)).first()
            if written is None:
                return False
            counter = batches.c.request_completed if ok else batches.c.request_failed
            conn.execute(update(batches).where(batches.c.id == batch_id).values({counter: counter + 1}))
        return True

    def records(self, batch_id: str, ok: bool) -> Iterator[str]:
        """The written records of one kind, in input line order, a page at a time."""
        last = 0
        while True:
            with self._db.read() as conn:
                rows = conn.execute(
                    select(batch_lines.c.line, batch_lines.c.record)
                    .where(batch_lines.c.batch_id == batch_id, batch_lines.c.ok.is_(ok), batch_lines.c.line > last)
                    .order_by(batch_lines.c.line).limit(_LINE_PAGE)).all()
            if not rows:
                return
            for _line, record in rows:
                yield record
            last = rows[-1][0]

    def count_lines(self, batch_id: str, ok: bool) -> int:
        with self._db.read() as conn:
            return conn.execute(select(func.count()).select_from(batch_lines).where(
                batch_lines.c.batch_id == batch_id, batch_lines.c.ok.is_(ok))).scalar_one()

    def set_status(self, batch_id: str, status: str, *, only_from: tuple[str, ...]) -> bool:
        """One transition (and its time); False when the batch was not in one of `only_from`."""
        values: dict[str, Any] = {"status": status}
        if f"{status}_at" in batches.c:
            values[f"{status}_at"] = int(time.time())
        with self._db.write() as conn:
            result = conn.execute(update(batches).where(batches.c.id == batch_id,
                                                        batches.c.status.in_(only_from)).values(values))
        return result.rowcount == 1

    def finish(self, batch_id: str, status: str, *, output_file_id: str | None,
               error_file_id: str | None) -> None:
        """The last transition: completed, cancelled or expired, with its files; the lease and the batch's
        copy of its input go (the caller deletes that blob)."""
        with self._db.write() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id).values(
                {"status": status, f"{status}_at": int(time.time()), "output_file_id": output_file_id,
                 "error_file_id": error_file_id, "input_blob": None, "lease_owner": None,
                 "lease_until": None}))

    def get_any(self, batch_id: str) -> BatchRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        return _record(row) if row is not None else None

    def blobs(self) -> set[str]:
        """Input copies still needed (for the orphan sweep)."""
        with self._db.read() as conn:
            return set(conn.execute(select(batches.c.input_blob).where(batches.c.input_blob.is_not(None)))
                       .scalars())
