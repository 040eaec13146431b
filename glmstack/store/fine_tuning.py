"""Rows of `fine_tuning_jobs` and `fine_tuning_events` (spec §2.13, §5).

Job ids are "ftjob-" + the creation time to the millisecond + 5 random characters, as the platform's are
("ftjob-20240115170023472-jss2f"), which also makes them sort in creation order. Reads take the owner; another
key's job is reported exactly like a missing one.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, delete, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store import leases
from glmstack.store.db import Database
from glmstack.store.ids import plausible_id
from glmstack.store.tables import fine_tuning_events, fine_tuning_jobs

ACTIVE = ("created", "validating_files", "queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")
_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class FineTuningJob:
    id: str
    key_id: str | None
    model: str
    fine_tuned_model: str
    method: str
    status: str
    training_file: str
    validation_file: str | None
    training_blob: str | None
    validation_blob: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    request_id: str | None
    error: dict[str, Any] | None
    trained_tokens: int | None
    result_files: list[str]
    model_deleted: bool
    attempts: int
    created_at: int
    finished_at: int | None


@dataclass(frozen=True)
class JobEvent:
    id: int
    created_at: int
    type: str
    level: str | None
    message: str | None
    data: dict[str, Any] | None


def _job(row: Row) -> FineTuningJob:
    v = dict(row._mapping)
    for name in ("lease_owner", "lease_until", "cancel_requested"):
        v.pop(name)
    v["hyperparameters"] = json.loads(v["hyperparameters"])
    v["error"] = json.loads(v["error"]) if v["error"] else None
    v["result_files"] = json.loads(v["result_files"]) if v["result_files"] else []
    v["model_deleted"] = bool(v["model_deleted"])
    return FineTuningJob(**v)


def _owned_by(key_id: str | None) -> ColumnElement[bool]:
    return fine_tuning_jobs.c.key_id.is_(None) if key_id is None else fine_tuning_jobs.c.key_id == key_id


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_job_id() -> str:
    now = datetime.now(UTC)
    return f"ftjob-{now:%Y%m%d%H%M%S}{now.microsecond // 1000:03d}-{_random(5)}"


def fine_tuned_model_id(base: str, suffix: str | None) -> str:
    """"ft:<base>:<suffix>:<8 random characters>" (spec §5.5); "glmstack" stands in for an empty suffix."""
    return f"ft:{base}:{suffix or 'glmstack'}:{_random(8)}"

_MAX_NAME = 200  # a job id, or a fine_tuned_model name ("ft:<base>:<suffix>:<id>")


class FineTuningStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- the API's side ---------------------------------------------------------------------------------

    def create(self, owner: str | None, *, model: str, method: str, training_file: str, training_blob: str,
               validation_file: str | None, validation_blob: str | None, hyperparameters: dict[str, Any],
               suffix: str | None, request_id: str | None) -> FineTuningJob:
        job_id = new_job_id()
        with self._db.write() as conn:
            conn.execute(insert(fine_tuning_jobs).values(
                id=job_id, key_id=owner, model=model, fine_tuned_model=fine_tuned_model_id(model, suffix),
                method=method, status="created", training_file=training_file, validation_file=validation_file,
                training_blob=training_blob, validation_blob=validation_blob,
                hyperparameters=json.dumps(hyperparameters), suffix=suffix, request_id=request_id,
                created_at=int(time.time())))
            self._event(conn, job_id, "message", "info", "Job created, validating files")
            return _job(conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)).one())

    def get(self, owner: str | None, job_id: str) -> FineTuningJob | None:
        if not plausible_id(job_id, _MAX_NAME):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id,
                                                              _owned_by(owner))).first()
        return _job(row) if row is not None else None

    def get_any(self, job_id: str) -> FineTuningJob | None:
        with self._db.read() as conn:
            row = conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)).first()
        return _job(row) if row is not None else None

    def by_model(self, owner: str | None, fine_tuned_model: str) -> FineTuningJob | None:
        if not plausible_id(fine_tuned_model, _MAX_NAME):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(fine_tuning_jobs).where(
                fine_tuning_jobs.c.fine_tuned_model == fine_tuned_model, _owned_by(owner))).first()
        return _job(row) if row is not None else None

    def page(self, owner: str | None, *, after: str | None, limit: int) -> tuple[list[FineTuningJob], bool]:
        """Newest first; `after`: the page after that job id."""
        query = select(fine_tuning_jobs).where(_owned_by(owner))
        if after is not None:
            if not plausible_id(after, _MAX_NAME):
                return [], False
            query = query.where(fine_tuning_jobs.c.id < after)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(fine_tuning_jobs.c.id.desc()).limit(limit + 1)).all()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, owner: str | None, job_id: str) -> FineTuningJob | None:
        """A job not yet running is cancelled here; a running one is marked for its runner to stop (the status
        turns `cancelled` once the trainer has stopped). Returns the job as it is now."""
        if not plausible_id(job_id, _MAX_NAME):
            return None
        with self._db.write() as conn:
            row = conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id,
                                                              _owned_by(owner))).first()
            if row is None:
                return None
            if row.status in ("created", "validating_files", "queued") and row.lease_owner is None:
                self._finish(conn, job_id, "cancelled", None)
                self._event(conn, job_id, "message", "info", "Job cancelled")
            elif row.status in ACTIVE:
                # the runner holding it sees this at its next heartbeat (or at once, in this process)
                conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)
                             .values(cancel_requested=True))
            return _job(conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)).one())

    def delete(self, owner: str | None, job_id: str) -> FineTuningJob | None:
        """Deletes a finished job (its events go with it); an active one is left alone (returned as is)."""
        job = self.get(owner, job_id)
        if job is None or job.status in ACTIVE:
            return job
        with self._db.write() as conn:
            conn.execute(delete(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id))
        return job

    def mark_model_deleted(self, owner: str | None, fine_tuned_model: str) -> FineTuningJob | None:
        job = self.by_model(owner, fine_tuned_model)
        if job is None:
            return None
        with self._db.write() as conn:
            conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job.id).values(model_deleted=True))
        return self.get_any(job.id)

    def events(self, owner: str | None, job_id: str, *, after: int | None, limit: int
               ) -> tuple[list[JobEvent], bool] | None:
        """Oldest first (as the documentation's example lists them), after the event id `after`."""
        if self.get(owner, job_id) is None:
            return None
        query = select(fine_tuning_events).where(fine_tuning_events.c.job_id == job_id)
        if after is not None:
            query = query.where(fine_tuning_events.c.id > after)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(fine_tuning_events.c.id).limit(limit + 1)).all()
        events = [JobEvent(id=r.id, created_at=r.created_at, type=r.type, level=r.level, message=r.message,
                           data=json.loads(r.data) if r.data else None) for r in rows[:limit]]
        return events, len(rows) > limit

    # ---- the runner's side ------------------------------------------------------------------------------

    def claim(self, me: str, lease_s: float) -> FineTuningJob | None:
        def count_attempt(conn: Connection, row_id: str) -> bool:
            conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == row_id)
                         .values(attempts=fine_tuning_jobs.c.attempts + 1))
            return True

        row = leases.claim_first(self._db, fine_tuning_jobs, fine_tuning_jobs.c.status.in_(ACTIVE),
                                 [fine_tuning_jobs.c.id], me, lease_s, count_attempt)
        return _job(row) if row is not None else None

    def renew(self, job_id: str, me: str, lease_s: float) -> bool | None:
        """Extends the lease; returns whether a cancel was asked for, None when the lease is not ours."""
        with self._db.write() as conn:
            if not leases.renew(conn, fine_tuning_jobs, job_id, me, lease_s):
                return None
            return bool(conn.execute(select(fine_tuning_jobs.c.cancel_requested)
                                     .where(fine_tuning_jobs.c.id == job_id)).scalar())

    def release(self, job_id: str, me: str) -> None:
        with self._db.write() as conn:
            leases.release(conn, fine_tuning_jobs, job_id, me)

    def set_status(self, job_id: str, status: str, message: str | None = None) -> None:
        with self._db.write() as conn:
            conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id).values(status=status))
            if message:
                self._event(conn, job_id, "message", "info", message)

    def finish(self, job_id: str, status: str, *, error: dict[str, Any] | None = None, message: str,
               trained_tokens: int | None = None, result_files: Sequence[str] = ()) -> None:
        """The last transition (succeeded, failed, cancelled) with its event; the lease and the job's file
        links go (the caller deletes those blobs)."""
        with self._db.write() as conn:
            values: dict[str, Any] = {"result_files": json.dumps(list(result_files))}
            if trained_tokens is not None:
                values["trained_tokens"] = trained_tokens
            conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id).values(values))
            self._finish(conn, job_id, status, error)
            self._event(conn, job_id, "message", "error" if status == "failed" else "info", message)

    def add_metrics(self, job_id: str, data: dict[str, Any], trained_tokens: int | None = None) -> None:
        with self._db.write() as conn:
            self._event(conn, job_id, "metrics", None, None, data)
            if trained_tokens is not None:
                conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id)
                             .values(trained_tokens=trained_tokens))

    def add_message(self, job_id: str, message: str, level: str = "info") -> None:
        with self._db.write() as conn:
            self._event(conn, job_id, "message", level, message)

    def last_step(self, job_id: str) -> int:
        """The highest step a metrics event reports (a resumed trainer logs again from its checkpoint: steps up
        to this one are not recorded twice)."""
        with self._db.read() as conn:
            rows = conn.execute(select(fine_tuning_events.c.data).where(
                fine_tuning_events.c.job_id == job_id, fine_tuning_events.c.type == "metrics")
                .order_by(fine_tuning_events.c.id.desc()).limit(1)).scalars().all()
        return int(json.loads(rows[0]).get("current_steps", 0)) if rows else 0

    def served_models(self) -> list[FineTuningJob]:
        """Succeeded jobs whose model was not deleted: what a starting server loads."""
        with self._db.read() as conn:
            rows = conn.execute(select(fine_tuning_jobs).where(fine_tuning_jobs.c.status == "succeeded",
                                                               fine_tuning_jobs.c.model_deleted.is_(False))).all()
        return [_job(r) for r in rows]

    def blobs(self) -> set[str]:
        with self._db.read() as conn:
            rows = conn.execute(select(fine_tuning_jobs.c.training_blob, fine_tuning_jobs.c.validation_blob)).all()
        return {b for row in rows for b in row if b}

    @staticmethod
    def _finish(conn: Any, job_id: str, status: str, error: dict[str, Any] | None) -> None:
        conn.execute(update(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id).values(
            status=status, finished_at=int(time.time()), error=json.dumps(error) if error else None,
            training_blob=None, validation_blob=None, lease_owner=None, lease_until=None))

    @staticmethod
    def _event(conn: Any, job_id: str, type_: str, level: str | None, message: str | None,
               data: dict[str, Any] | None = None) -> None:
        conn.execute(insert(fine_tuning_events).values(
            job_id=job_id, created_at=int(time.time()), type=type_, level=level, message=message,
            data=json.dumps(data) if data is not None else None))
