"""`Store`: the database, migrated to the newest schema, with the key and usage stores on top."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select, text

from glmstack.store.async_tasks import AsyncTaskStore
from glmstack.store.batches import BatchStore
from glmstack.store.blobs import BlobStore
from glmstack.store.conversations import ConversationStore
from glmstack.store.db import Database, migrate
from glmstack.store.files import FileStore
from glmstack.store.fine_tuning import FineTuningStore
from glmstack.store.keys import KeyStore
from glmstack.store.knowledge import KnowledgeStore
from glmstack.store.master_key import load_master_key
from glmstack.store.tables import documents
from glmstack.store.usage import UsageStore

log = logging.getLogger(__name__)

MASTER_KEY_FILE = "secret.key"


class Store:
    """Opening one runs any pending migrations and creates the master key on first use. Thread-safe: share
    one per process."""

    def __init__(self, database_url: str, *, home: Path):
        self._db = Database(database_url)
        try:
            migrate(self._db)
            sealer = load_master_key(Path(home) / MASTER_KEY_FILE)
        except BaseException:
            self._db.dispose()
            raise
        self.keys = KeyStore(self._db, sealer)
        self.usage = UsageStore(self._db)
        self.blobs = BlobStore(Path(home) / "files")
        self.files = FileStore(self._db)
        self.knowledge = KnowledgeStore(self._db)
        self.async_tasks = AsyncTaskStore(self._db)
        self.batches = BatchStore(self._db)
        self.fine_tuning = FineTuningStore(self._db)
        self.conversations = ConversationStore(self._db)

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.dialect

    def healthy(self) -> bool:
        """Whether the database answers a trivial query now (a PostgreSQL connect gives up after a few
        seconds). Never raises: meant for health checks."""
        try:
            with self._db.read() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:  # a health check reports; it never raises
            log.warning("database health check failed: %s", e)
            return False
        return True

    def sweep_orphan_blobs(self) -> int:
        """Removes staging leftovers and blobs that neither a file nor a document names (an upload cut off
        by a crash); returns how many. Run at start-up."""
        with self._db.read() as conn:
            named = set(conn.execute(select(documents.c.blob).where(documents.c.blob.is_not(None))).scalars())
        return self.blobs.sweep(named | self.files.blobs() | self.batches.blobs()
                                | self.fine_tuning.blobs())

    def close(self) -> None:
        self._db.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
