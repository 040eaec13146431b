"""Persistence: API keys and usage, in SQLite (default) or PostgreSQL, behind one `Store`.

    store = Store(settings.database_url, home=settings.home)   # migrates the schema to the newest version
    record, full_key = store.keys.create("laptop")
    store.keys.verify_secret(key_id, secret)                   # KeyRecord or None
    store.usage.record(record.id, "glm-4", prompt_tokens=12, completion_tokens=30)

Every method raises StoreUnavailableError, within seconds, when the database cannot be reached.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from glmstack.store.errors import StoreError, StoreUnavailableError

if TYPE_CHECKING:
    from glmstack.store.keys import KeyRecord, KeyStore
    from glmstack.store.store import Store
    from glmstack.store.usage import UsageRow, UsageStore

__all__ = ["KeyRecord", "KeyStore", "Store", "StoreError", "StoreUnavailableError", "UsageRow", "UsageStore"]

# Loaded on first use: every `glmstack` command builds a parser that imports glmstack.cli.keys, and
# importing SQLAlchemy up front would add ~0.4 s to `glmstack chat`.
_LAZY = {
    "Store": "glmstack.store.store",
    "KeyRecord": "glmstack.store.keys",
    "KeyStore": "glmstack.store.keys",
    "UsageRow": "glmstack.store.usage",
    "UsageStore": "glmstack.store.usage",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
