"""Token usage per key, model and UTC day (spec §1.13: billed tokens = prompt + completion)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from functools import cache

from sqlalchemy import Insert, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite

from glmstack.store.db import Database
from glmstack.store.errors import StoreError
from glmstack.store.tables import USAGE_KEY, usage

log = logging.getLogger(__name__)

_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
_COUNTS = ("requests", "prompt_tokens", "completion_tokens")


@cache
def _upsert(dialect: str) -> Insert:
    """The usage upsert with bound parameters, built once per dialect: building it per call (and its cache
    key, every time) cost more than the database write itself. One atomic statement, so concurrent writers
    add to the row rather than overwrite each other."""
    statement = _INSERT[dialect](usage).values({c: bindparam(c) for c in ("key_id", "model", "day", *_COUNTS)})
    return statement.on_conflict_do_update(
        index_elements=[USAGE_KEY, usage.c.model, usage.c.day],
        set_={name: usage.c[name] + statement.excluded[name] for name in _COUNTS},
    )


@dataclass(frozen=True)
class UsageRow:
    key_id: str | None
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageStore:
    def __init__(self, db: Database):
        self._db = db

    def record(self, key_id: str | None, model: str, prompt_tokens: int, completion_tokens: int, *,
               requests: int = 1, day: date | None = None) -> None:
        """Add `requests` requests to the row for (key, model, day; today unless given). `key_id` is an
        existing key's id, or None when the server runs without keys."""
        row = {"key_id": key_id, "model": model, "day": day or datetime.now(UTC).date(), "requests": requests,
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        with self._db.write() as conn:
            conn.execute(_upsert(self._db.dialect), row)

    def report(self, key_id: str | None = None) -> list[UsageRow]:
        """Totals per key and model over all days, sorted by key then model; only `key_id`'s when given."""
        query = (select(usage.c.key_id, usage.c.model, func.sum(usage.c.requests),
                        func.sum(usage.c.prompt_tokens), func.sum(usage.c.completion_tokens))
                 .group_by(usage.c.key_id, usage.c.model))
        if key_id is not None:
            query = query.where(usage.c.key_id == key_id)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        # int(): PostgreSQL sums bigints into numeric, which arrives as Decimal.
        report = [UsageRow(key, model, int(requests), int(prompt), int(completion))
                  for key, model, requests, prompt, completion in rows]
        return sorted(report, key=lambda r: (r.key_id or "", r.model))


_Slot = tuple[str | None, str, date]  # key, model, UTC day: one usage row


class UsageWriter:
    """Records usage from one background thread, so that no reply waits for a database write.

    `add` only adds to an in-memory tally (microseconds, any thread). The writer thread moves the tally into
    the database, one upsert per (key, model, day): under load many requests share a transaction, which
    also keeps SQLite's single writer free for everything else. When the database refuses (PostgreSQL
    down), the tally is kept and retried, so an outage delays usage rows instead of losing them. `flush`
    waits until everything added so far is written; `close` flushes and stops the thread. What a process
    that is killed outright had not yet written (at most the last `GATHER_SECONDS`' requests) is lost.

    The thread gathers for `GATHER_SECONDS` after the first request of a batch before it writes. Writing
    after every request cost ~3 ms of CPU (SQLAlchemy + SQLite) per request, taken from the engine's
    threads on a small machine just as the next request's prefill ran; gathered, one write serves every
    request of that half second.
    """

    RETRY_SECONDS = 1.0
    GATHER_SECONDS = 0.5

    def __init__(self, store: UsageStore) -> None:
        self._store = store
        self._pending: Counter[tuple[_Slot, str]] = Counter()
        self._added = self._written = 0  # requests added / written, for flush
        self._changed = threading.Condition()
        self._stopping = False
        self._wanted = 0  # requests a flush waits for: while some are unwritten, the writer doesn't gather
        self._thread: threading.Thread | None = None

    def add(self, key_id: str | None, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        slot = (key_id, model, datetime.now(UTC).date())
        with self._changed:
            if self._stopping:
                raise RuntimeError("the usage writer is closed")
            first = not self._pending
            self._pending[(slot, "requests")] += 1
            self._pending[(slot, "prompt_tokens")] += prompt_tokens
            self._pending[(slot, "completion_tokens")] += completion_tokens
            self._added += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="glmstack-usage", daemon=True)
                self._thread.start()
            if first:  # wakes the writer; the rest of the batch joins it while it gathers
                self._changed.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every request added before the call is in the database; False on timeout."""
        with self._changed:
            target = self._added
            self._wanted = max(self._wanted, target)
            self._changed.notify_all()
            return self._changed.wait_for(lambda: self._written >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("usage writer: %d requests' usage not written at shutdown", self._added - self._written)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._stopping)
                self._changed.wait_for(lambda: self._stopping or self._wanted > self._written, self.GATHER_SECONDS)
                if not self._pending:
                    return  # stopping, and nothing left
                batch, self._pending = self._pending, Counter()
            written, failed = self._write(batch)
            with self._changed:
                self._pending.update(failed)  # retried on the next round
                self._written += written
                self._changed.notify_all()
                if failed and self._stopping:
                    lost = sum(n for (_, name), n in failed.items() if name == "requests")
                    log.error("usage writer: database unavailable at shutdown; %d requests' usage lost", lost)
                    return
            if failed:
                with self._changed:
                    self._changed.wait_for(lambda: self._stopping, self.RETRY_SECONDS)

    def _write(self, batch: Counter[tuple[_Slot, str]]) -> tuple[int, Counter[tuple[_Slot, str]]]:
        """Writes each row of `batch`: (requests written, the rows that failed, to retry)."""
        written, failed = 0, Counter[tuple[_Slot, str]]()
        for slot in dict.fromkeys(slot for slot, _ in batch):
            key_id, model, day = slot
            requests = batch[(slot, "requests")]
            try:
                self._store.record(key_id, model, batch[(slot, "prompt_tokens")],
                                   batch[(slot, "completion_tokens")], requests=requests, day=day)
            except StoreError as e:  # the database is away: keep the row and try again
                log.error("usage for key %s not written yet (will retry): %s", key_id, e)
                for name in ("requests", "prompt_tokens", "completion_tokens"):
                    failed[(slot, name)] = batch[(slot, name)]
                continue
            except Exception:  # a bug, not an outage: retrying would fail the same way forever
                log.exception("usage for key %s dropped", key_id)
            written += requests
        return written, failed
