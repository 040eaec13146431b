"""Rows of `async_tasks`: async chat (spec §2.3-2.4). PROCESSING until a runner writes SUCCESS or FAIL.

A task whose runner died is claimed again (see leases.py) and run from the start; after MAX_ATTEMPTS starts it
fails visibly instead of looping. Finished tasks are kept for the configured time, then deleted.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, delete, select, update
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store import leases
from glmstack.store.db import Database
from glmstack.store.ids import plausible_id
from glmstack.store.tables import async_tasks

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class AsyncTask:
    id: str
    key_id: str | None
    request_id: str
    model: str
    body: dict[str, Any]
    status: str  # PROCESSING | SUCCESS | FAIL
    result: dict[str, Any] | None
    attempts: int
    created_at: datetime


def _task(row: Row) -> AsyncTask:
    created = row.created_at if row.created_at.tzinfo is not None else row.created_at.replace(tzinfo=UTC)
    return AsyncTask(id=row.id, key_id=row.key_id, request_id=row.request_id, model=row.model,
                     body=json.loads(row.body), status=row.status,
                     result=json.loads(row.result) if row.result else None, attempts=row.attempts,
                     created_at=created)


def _owned_by(key_id: str | None) -> ColumnElement[bool]:
    return async_tasks.c.key_id.is_(None) if key_id is None else async_tasks.c.key_id == key_id


def new_task_id() -> str:
    # digits, as the platform's task ids are ("123456789", "8508171013904997988...")
    return str(secrets.randbits(100))


class AsyncTaskStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, owner: str | None, *, request_id: str | None, model: str, body: dict[str, Any]) -> AsyncTask:
        task_id = new_task_id()
        values = dict(id=task_id, key_id=owner, request_id=request_id or task_id, model=model,
                      body=json.dumps(body), status="PROCESSING",
                      created_at=datetime.now(UTC))
        with self._db.write() as conn:
            conn.execute(async_tasks.insert().values(**values))
            return _task(conn.execute(select(async_tasks).where(async_tasks.c.id == task_id)).one())

    def get(self, owner: str | None, task_id: str) -> AsyncTask | None:
        if not plausible_id(task_id):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(async_tasks).where(async_tasks.c.id == task_id, _owned_by(owner))).first()
        return _task(row) if row is not None else None

    def claim(self, me: str, lease_s: float) -> AsyncTask | None:
        """The oldest PROCESSING task nobody holds, leased to `me`, its attempts counted. One that has been
        started MAX_ATTEMPTS times already is failed here instead (a request that kills its server)."""
        def count_attempt(conn: Connection, row_id: str) -> bool:
            attempts = conn.execute(select(async_tasks.c.attempts).where(async_tasks.c.id == row_id)).scalar_one()
            if attempts >= MAX_ATTEMPTS:
                error = {"code": "1234", "message": f"the task was started {attempts} times and never "
                                                    "finished (the server stopped while running it)"}
                self._finish(conn, row_id, "FAIL", {"error": error})
                return False
            conn.execute(update(async_tasks).where(async_tasks.c.id == row_id)
                         .values(attempts=async_tasks.c.attempts + 1))
            return True

        row = leases.claim_first(self._db, async_tasks, async_tasks.c.status == "PROCESSING",
                                 [async_tasks.c.created_at, async_tasks.c.id], me, lease_s, count_attempt)
        return _task(row) if row is not None else None

    def renew(self, task_id: str, me: str, lease_s: float) -> bool:
        with self._db.write() as conn:
            return leases.renew(conn, async_tasks, task_id, me, lease_s)

    def release(self, task_id: str, me: str) -> None:
        with self._db.write() as conn:
            leases.release(conn, async_tasks, task_id, me)

    def finish(self, task_id: str, me: str, status: str, result: dict[str, Any]) -> bool:
        """SUCCESS or FAIL with its result, if the task is still ours and still PROCESSING."""
        with self._db.write() as conn:
            held = conn.execute(select(async_tasks.c.id).where(
                async_tasks.c.id == task_id, async_tasks.c.lease_owner == me,
                async_tasks.c.status == "PROCESSING")).first()
            if held is None:
                return False
            self._finish(conn, task_id, status, result)
        return True

    @staticmethod
    def _finish(conn: Any, task_id: str, status: str, result: dict[str, Any]) -> None:
        conn.execute(update(async_tasks).where(async_tasks.c.id == task_id).values(
            status=status, result=json.dumps(result, ensure_ascii=False), finished_at=datetime.now(UTC),
            lease_owner=None, lease_until=None))

    def delete_finished_before(self, cutoff_s: float) -> int:
        """Deletes tasks finished more than `cutoff_s` seconds ago; returns how many."""
        cutoff = datetime.now(UTC) - timedelta(seconds=cutoff_s)
        with self._db.write() as conn:
            return conn.execute(delete(async_tasks).where(async_tasks.c.status != "PROCESSING",
                                                          async_tasks.c.finished_at < cutoff)).rowcount
