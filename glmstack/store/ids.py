"""The one check every lookup by id makes before the database sees the id."""

from __future__ import annotations

MAX_ID_LENGTH = 40  # the id columns of files, conversations, batches and async tasks (store/tables.py)


def plausible_id(value: str, max_length: int = MAX_ID_LENGTH) -> bool:
    """Ids arrive from URLs and request bodies; one that no table could hold is simply not found. PostgreSQL
    refuses some strings outright (a NUL is a DataError, not "no row"), so the check comes first."""
    return 0 < len(value) <= max_length and value.isascii() and value.isprintable()
