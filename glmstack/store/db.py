"""The SQLAlchemy engine and migrations, one code path for SQLite and PostgreSQL.

SQLite (the default, a file in GLMSTACK_HOME) runs in WAL mode so readers never wait for the writer, with a
busy timeout so a second writer waits its turn instead of failing at once, and every write transaction
starts with `BEGIN IMMEDIATE`: a deferred transaction that reads and then writes can fail with "database is
locked" *without* waiting, because SQLite cannot upgrade its read lock while another writer is queued.
PostgreSQL goes through psycopg 3 with a short connect timeout, so an outage surfaces as
StoreUnavailableError within seconds rather than as a hung request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlalchemy.engine import URL, make_url

from glmstack.store.errors import StoreUnavailableError

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 5000
POSTGRES_CONNECT_TIMEOUT_S = 3
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Every glmstack process takes this PostgreSQL advisory lock while migrating, so two servers starting at
# once do not both try to create the tables. Any constant works as long as all versions agree on it.
_MIGRATION_LOCK_ID = 0x676C6D73  # "glms"
_WRITE = "glmstack_write"  # execution option that marks a connection's transactions as writes


def normalize_url(url: str | URL) -> URL:
    """`postgres://` and `postgresql://` mean psycopg 3, the driver glmstack ships (SQLAlchemy's default
    would be psycopg2, which is not installed)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_db_engine(url: str | URL) -> Engine:
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        return create_engine(parsed, pool_pre_ping=True, pool_timeout=10,
                             connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S})
    raise ValueError(f"unsupported database URL {parsed!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")


def sqlite_module() -> Any:
    """The DB-API module SQLite connections are made with: one that can load extensions (sqlite-vec, for the
    knowledge bases' vectors). Python's own sqlite3 where it was built with `enable_load_extension`, else
    pysqlite3 (pysqlite3-binary, a recent SQLite with FTS5) - never both in one process. None of them:
    Python's sqlite3, and knowledge bases report that vectors are unavailable."""
    import sqlite3

    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3.dbapi2 as pysqlite3  # type: ignore[import-untyped]
    except ImportError:
        return sqlite3
    return pysqlite3


def load_sqlite_vec(dbapi_connection: Any) -> bool:
    """Load sqlite-vec into a connection; False (and one warning per process) where it cannot be."""
    global _vec_warned
    try:
        import sqlite_vec  # type: ignore[import-untyped]

        dbapi_connection.enable_load_extension(True)
        sqlite_vec.load(dbapi_connection)
        dbapi_connection.enable_load_extension(False)
        return True
    except Exception as e:  # no extension loading in this Python, or no sqlite-vec: knowledge says so
        if not _vec_warned:
            log.warning("sqlite-vec could not be loaded (%s): knowledge-base vectors are unavailable", e)
            _vec_warned = True
        return False


_vec_warned = False


def _sqlite_engine(url: URL) -> Engine:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailableError(f"cannot create the directory for {database}: {e}") from e
    # The pool hands each connection to one thread at a time, so pysqlite's same-thread check only gets in
    # the way.
    engine = create_engine(url, module=sqlite_module(), connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Turn off pysqlite's own transaction handling (it always emits a deferred BEGIN); _on_begin below
        # starts transactions instead. This is SQLAlchemy's documented recipe for pysqlite.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")  # before WAL: switching may wait
        cursor.execute("PRAGMA journal_mode = WAL")
        # NORMAL is WAL's recommended level: a power cut can lose the last commits but never corrupts.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()
        load_sqlite_vec(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


@contextmanager
def translate_errors() -> Iterator[None]:
    """Driver errors that mean "the database is not there or too busy" become StoreUnavailableError;
    anything else (a bug) propagates unchanged."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError) as e:
        raise StoreUnavailableError(f"database unavailable: {_first_line(e)}") from e
    except exc.DBAPIError as e:
        if e.connection_invalidated:
            raise StoreUnavailableError(f"database connection lost: {_first_line(e)}") from e
        raise


def _first_line(e: Exception) -> str:
    orig = getattr(e, "orig", None)
    message = str(orig if orig is not None else e).strip()
    return message.splitlines()[0] if message else type(e).__name__


class Database:
    """An engine plus the two kinds of transaction the stores use: `read()` and `write()`."""

    def __init__(self, url: str | URL):
        self.engine = create_db_engine(url)
        self._writer = self.engine.execution_options(**{_WRITE: True})

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with translate_errors(), self.engine.begin() as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that takes SQLite's write lock up front (BEGIN IMMEDIATE); a plain transaction on
        PostgreSQL, where row locks and ON CONFLICT already make the upserts safe."""
        with translate_errors(), self._writer.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()


def migrate(database: str | URL | Database) -> None:
    """Upgrade the schema to the newest migration shipped in glmstack/store/migrations. Idempotent, and safe
    when several processes start at once (one transaction, serialized by the database)."""
    from alembic import command
    from alembic.config import Config

    db = database if isinstance(database, Database) else Database(database)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
        with db.write() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            # Alembic's env.py runs on this connection; since it is already in a transaction, Alembic does
            # not open its own, so the lock above covers the whole upgrade.
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        if db is not database:
            db.dispose()
