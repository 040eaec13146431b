"""Token usage per key, model and UTC day (spec §1.13: billed tokens = prompt + completion)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from glmstack.store.db import Database
from glmstack.store.tables import USAGE_KEY, usage

_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


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

    def record(self, key_id: str | None, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Add one request to today's row for (key, model). `key_id` is an existing key's id, or None when
        the server runs without keys."""
        row = {"key_id": key_id, "model": model, "day": datetime.now(UTC).date(), "requests": 1,
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        statement = _INSERT[self._db.dialect](usage).values(**row)
        # One atomic statement: concurrent writers add to the row rather than overwrite each other.
        statement = statement.on_conflict_do_update(
            index_elements=[USAGE_KEY, usage.c.model, usage.c.day],
            set_={name: usage.c[name] + statement.excluded[name]
                  for name in ("requests", "prompt_tokens", "completion_tokens")},
        )
        with self._db.write() as conn:
            conn.execute(statement)

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
