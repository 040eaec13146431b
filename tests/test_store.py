"""The store: migrations, API keys, usage accounting and the `glmstack keys` / `glmstack usage` commands, on
SQLite and on PostgreSQL (the `database_url` fixture in conftest.py runs each test on both)."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import string
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken
from servers import Relay

from glmstack.store import KeyRecord, Store, StoreUnavailableError, UsageRow
from glmstack.store.db import create_db_engine, migrate
from glmstack.store.tables import metadata
from glmstack.store.usage import UsageWriter


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def store(database_url: str, home: Path):
    with Store(database_url, home=home) as store:
        yield store


def _rows(database_url: str, table: str) -> list[sa.Row]:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT * FROM {table}")))
    finally:
        engine.dispose()


# ---- migrations -----------------------------------------------------------------------------------------


def _not_full_text_index(name: str | None, kind: str, _parent: object) -> bool:
    """The full-text indexes are the databases' own (SQLite's FTS5 virtual tables, PostgreSQL's GIN expression
    index), made by the migration in SQL that SQLAlchemy tables cannot describe."""
    return not (name or "").startswith(("chunks_fts", "ix_chunks_terms_fts"))


def test_migrations_create_the_schema_and_are_idempotent(database_url: str, home: Path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from glmstack.store.db import MIGRATIONS_DIR

    migrate(database_url)
    migrate(database_url)
    Store(database_url, home=home).close()

    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
            assert versions == [ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()]
            with warnings.catch_warnings():
                # SQLite cannot reflect the expression index on usage; PostgreSQL compares it too.
                warnings.simplefilter("ignore")
                context = MigrationContext.configure(conn, opts={"include_name": _not_full_text_index})
                assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'db' / 'glmstack.db'}")  # creates the directory
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()


# ---- keys -----------------------------------------------------------------------------------------------


def test_key_lifecycle(store: Store):
    record, full_key = store.keys.create("laptop", concurrency_limit=3)
    key_id, secret = full_key.split(".")
    assert record.id == key_id and record.name == "laptop" and record.concurrency_limit == 3
    assert len(key_id) == 16 and set(key_id) <= set(string.ascii_letters + string.digits)
    assert len(secret) >= 32 and set(secret) <= set(string.ascii_letters + string.digits + "-_")
    assert record.created_at.tzinfo is not None and record.revoked_at is None

    assert store.keys.verify_secret(key_id, secret) == record
    assert store.keys.signing_secret(key_id) == secret
    assert store.keys.verify_secret(key_id, secret[:-1]) is None
    assert store.keys.verify_secret(key_id, "") is None
    assert store.keys.verify_secret("nosuchkey0000000", secret) is None
    assert store.keys.signing_secret("nosuchkey0000000") is None

    other, _ = store.keys.create()
    assert [k.id for k in store.keys.list()] == [key_id, other.id]
    assert store.keys.count_active() == 2

    assert store.keys.revoke(key_id) is True
    assert store.keys.revoke(key_id) is False
    assert store.keys.revoke("nosuchkey0000000") is False
    assert store.keys.verify_secret(key_id, secret) is None
    assert store.keys.signing_secret(key_id) is None
    assert store.keys.count_active() == 1
    revoked = next(k for k in store.keys.list() if k.id == key_id)
    assert revoked.revoked_at is not None and revoked.revoked_at >= revoked.created_at


class FakeClock:
    """Stands in for time.monotonic: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_verified_keys_are_remembered_briefly(database_url: str, store: Store, home: Path):
    """A verified key skips the database for VERIFIED_TTL_S; revoking it in the same process forgets it at
    once, and a revocation by another process (the CLI, here a second Store) takes hold within the TTL.
    The key store's clock is a fake one, advanced by hand: nothing here waits for real time to pass."""
    from glmstack.store.db import Database
    from glmstack.store.keys import VERIFIED_TTL_S, KeyStore
    from glmstack.store.master_key import load_master_key
    from glmstack.store.store import MASTER_KEY_FILE

    clock = FakeClock()
    db = Database(database_url)  # the schema and the master key are the `store` fixture's
    try:
        keys = KeyStore(db, load_master_key(home / MASTER_KEY_FILE), clock=clock)
        record, key = keys.create("remembered")
        key_id, secret = key.split(".")
        assert keys.verify_secret(key_id, secret) == record
        assert keys.signing_secret(key_id) == secret
        with Store(database_url, home=home) as other_process:
            assert other_process.keys.revoke(key_id)
        assert keys.verify_secret(key_id, secret) == record  # remembered: within the TTL
        assert keys.verify_secret(key_id, secret + "x") is None  # only what was verified is remembered
        clock.advance(VERIFIED_TTL_S / 2)
        assert keys.verify_secret(key_id, secret) == record  # still remembered, halfway through the TTL
        assert keys.signing_secret(key_id) == secret
        clock.advance(VERIFIED_TTL_S / 2)  # the TTL is up: the database is asked again, and says revoked
        assert keys.verify_secret(key_id, secret) is None
        assert keys.signing_secret(key_id) is None

        record, key = keys.create("revoked here")
        key_id, secret = key.split(".")
        assert keys.verify_secret(key_id, secret) == record
        assert keys.signing_secret(key_id) == secret
        assert keys.revoke(key_id)  # no time passes: forgotten at once
        assert keys.verify_secret(key_id, secret) is None
        assert keys.signing_secret(key_id) is None
    finally:
        db.dispose()


def test_key_input_is_validated(store: Store):
    with pytest.raises(ValueError, match="concurrency"):
        store.keys.create(concurrency_limit=0)
    with pytest.raises(ValueError, match="name"):
        store.keys.create("x" * 201)


def test_secret_is_stored_hashed_and_sealed_under_the_master_key(database_url: str, store: Store, home: Path):
    _, full_key = store.keys.create("ci")
    key_id, secret = full_key.split(".")

    [row] = _rows(database_url, "api_keys")
    assert secret not in {str(value) for value in row}
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()

    key_file = home / "secret.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Fernet(key_file.read_bytes()).decrypt(row.sealed_secret.encode()).decode() == secret
    with pytest.raises(InvalidToken, match="^$"):  # Fernet's refusal carries no message
        Fernet(Fernet.generate_key()).decrypt(row.sealed_secret.encode())

    # Another server home has another master key: plain keys still verify (by hash), JWT secrets don't unseal.
    with Store(database_url, home=home.parent / "elsewhere") as stranger:
        assert stranger.keys.verify_secret(key_id, secret) is not None
        assert stranger.keys.signing_secret(key_id) is None


def test_master_key_is_created_once_even_by_racing_processes(tmp_path: Path):
    from glmstack.store.master_key import load_master_key

    path = tmp_path / "home" / "secret.key"
    start = threading.Barrier(8)
    keys: list[Fernet] = []

    def load() -> None:
        start.wait()
        keys.append(load_master_key(path))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    token = keys[0].encrypt(b"x")
    assert len(keys) == 8 and all(k.decrypt(token) == b"x" for k in keys)
    assert load_master_key(path).decrypt(token) == b"x"
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary files left behind


# ---- usage ----------------------------------------------------------------------------------------------


def test_usage_accumulates_per_key_and_model(database_url: str, store: Store):
    a, _ = store.keys.create("a")
    b, _ = store.keys.create("b")
    store.usage.record(a.id, "glm-4", 10, 20)
    store.usage.record(a.id, "glm-4", 1, 2)
    store.usage.record(a.id, "glm-4-flash", 5, 0)
    store.usage.record(b.id, "glm-4", 7, 8)
    store.usage.record(None, "glm-4", 3, 4)
    store.usage.record(None, "glm-4", 3, 4)

    assert store.usage.report() == sorted([
        UsageRow(None, "glm-4", 2, 6, 8),
        UsageRow(a.id, "glm-4", 2, 11, 22),
        UsageRow(a.id, "glm-4-flash", 1, 5, 0),
        UsageRow(b.id, "glm-4", 1, 7, 8),
    ], key=lambda r: (r.key_id or "", r.model))
    assert store.usage.report(a.id) == [UsageRow(a.id, "glm-4", 2, 11, 22),
                                        UsageRow(a.id, "glm-4-flash", 1, 5, 0)]
    assert store.usage.report(a.id)[0].total_tokens == 33
    assert store.usage.report("nosuchkey0000000") == []
    # Upserts, not appends: one row per (key, model, day), the keyless requests included.
    assert len(_rows(database_url, "usage")) == 4


def _count_writes(store: Store) -> list[int]:
    """Wraps store.usage.record: the returned list gets each write's request count."""
    calls: list[int] = []
    record = store.usage.record

    def counting_record(*args, **kwargs) -> None:
        calls.append(kwargs.get("requests", 1))
        record(*args, **kwargs)

    store.usage.record = counting_record  # type: ignore[method-assign]
    return calls


def test_usage_writer_tallies_many_threads_into_few_writes(database_url: str, store: Store):
    """What the server uses: adds from many threads, written behind them; flush waits for all of them."""
    key, _ = store.keys.create("w")
    writer = UsageWriter(store.usage)
    calls = _count_writes(store)
    threads = [threading.Thread(target=lambda: [writer.add(key.id, "glm-4", 3, 5) for _ in range(100)])
               for _ in range(8)]
    for t in threads:
        t.start()
    writer.add(None, "glm-4", 1, 1)
    for t in threads:
        t.join()
    assert writer.flush(timeout=30)
    assert store.usage.report(key.id) == [UsageRow(key.id, "glm-4", 800, 2400, 4000)]
    assert [r for r in store.usage.report() if r.key_id is None] == [UsageRow(None, "glm-4", 1, 1, 1)]
    assert sum(calls) == 801 and len(calls) < 801  # requests were batched into shared upserts
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(key.id, "glm-4", 1, 1)


def test_usage_writer_gathers_one_request_after_another_into_one_write(store: Store):
    """Requests that end one after another (a single client) share a write: the writer gathers for
    GATHER_SECONDS after the first. A flush does not wait for the gathering to end."""
    key, _ = store.keys.create("g")
    writer = UsageWriter(store.usage)
    writer.GATHER_SECONDS = 3600.0  # only a flush (or close) can end this gathering
    calls = _count_writes(store)
    for _ in range(20):
        writer.add(key.id, "glm-4", 2, 3)
        time.sleep(0.005)
    assert calls == []  # still gathering
    assert writer.flush(timeout=30)
    assert calls == [20]
    assert store.usage.report(key.id) == [UsageRow(key.id, "glm-4", 20, 40, 60)]
    writer.add(key.id, "glm-4", 1, 1)
    writer.close()  # ends the next gathering too, and writes it
    assert calls == [20, 1]


def test_usage_writer_keeps_usage_through_a_database_outage(store: Store):
    """A database that refuses writes for a while delays the usage rows; nothing is lost, and close()
    writes what is still pending."""
    key, _ = store.keys.create("o")
    writer = UsageWriter(store.usage)
    writer.RETRY_SECONDS = 0.05
    refusals = [3]
    record = store.usage.record

    def refusing_record(*args, **kwargs) -> None:
        if refusals[0]:
            refusals[0] -= 1
            raise StoreUnavailableError("database unavailable (test)")
        record(*args, **kwargs)

    store.usage.record = refusing_record  # type: ignore[method-assign]
    writer.add(key.id, "glm-4", 10, 20)
    writer.add(key.id, "glm-4", 1, 2)
    assert writer.flush(timeout=30)
    assert refusals == [0]
    writer.add(key.id, "glm-4", 100, 200)
    writer.close()
    assert store.usage.report(key.id) == [UsageRow(key.id, "glm-4", 3, 111, 222)]


def test_concurrent_usage_writes_do_not_fail(database_url: str, home: Path):
    """32 threads x 50 writes through four Stores (four engines, as if four processes) on one database: on
    SQLite every write waits its turn (BEGIN IMMEDIATE + busy timeout) instead of "database is locked"."""
    threads_n, writes = 32, 50
    stores = [Store(database_url, home=home) for _ in range(4)]
    key, _ = stores[0].keys.create()
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(writes):
                stores[i % len(stores)].usage.record(key.id if i % 2 else None, "glm-4", 2, 3)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        half = threads_n // 2 * writes
        assert stores[0].usage.report() == [UsageRow(None, "glm-4", half, 2 * half, 3 * half),
                                            UsageRow(key.id, "glm-4", half, 2 * half, 3 * half)]
    finally:
        for s in stores:
            s.close()


# ---- outages --------------------------------------------------------------------------------------------


def test_unreachable_postgres_fails_fast_with_a_typed_error(home: Path):
    # A server that accepts the TCP connection and then never answers: only the connect timeout ends it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="^database unavailable: .*timeout"):
            Store(f"postgresql://glmstack:x@127.0.0.1:{port}/glmstack", home=home)
        assert time.monotonic() - started < 10


def test_postgres_outage_after_start_is_reported_not_hung(database_url: str, home: Path):
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() != "postgresql":
        pytest.skip("a network outage is a PostgreSQL matter")
    relay = Relay(url.host or "127.0.0.1", url.port or 5432)
    store = Store(relay.url_for(database_url), home=home)
    try:
        key, full_key = store.keys.create()
        assert store.healthy()
        relay.down()
        started = time.monotonic()
        assert not store.healthy()
        with pytest.raises(StoreUnavailableError, match="^database (unavailable|connection lost): "):
            store.keys.verify_secret(key.id, full_key.split(".")[1])
        with pytest.raises(StoreUnavailableError, match="^database (unavailable|connection lost): "):
            store.usage.record(key.id, "glm-4", 1, 1)
        assert time.monotonic() - started < 10
    finally:
        relay.down()
        store.close()


# ---- the command line -----------------------------------------------------------------------------------


def _glmstack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "glmstack.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_keys_and_usage_commands(database_url: str, home: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMSTACK_")}
    env["GLMSTACK_HOME"] = str(home)
    if database_url.startswith("postgresql"):
        env["GLMSTACK_DATABASE_URL"] = database_url
    else:
        database_url = f"sqlite:///{home / 'glmstack.db'}"  # the default: SQLite in GLMSTACK_HOME

    created = _glmstack(env, "keys", "create", "--name", "ci", "--concurrency", "3")
    assert created.returncode == 0, created.stderr
    full_key = created.stdout.strip()
    key_id, secret = full_key.split(".")
    assert "shown again" in created.stderr

    with Store(database_url, home=home) as store:
        assert store.keys.verify_secret(key_id, secret) == KeyRecord(
            key_id, "ci", store.keys.list()[0].created_at, None, 3)
        store.usage.record(key_id, "glm-4", 12, 30)

    listed = _glmstack(env, "keys", "list")
    assert listed.returncode == 0 and key_id in listed.stdout and "active" in listed.stdout

    usage = _glmstack(env, "usage", "--key", key_id)
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.splitlines()[1].split() == [key_id, "glm-4", "1", "12", "30", "42"]

    assert _glmstack(env, "keys", "revoke", key_id).returncode == 0
    again = _glmstack(env, "keys", "revoke", key_id)
    assert again.returncode == 1 and "no active key" in again.stderr
    assert "revoked" in _glmstack(env, "keys", "list").stdout


def test_command_reports_an_unreachable_database_in_one_line(home: Path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLMSTACK_HOME": str(home),
           "GLMSTACK_DATABASE_URL": f"postgresql://glmstack:x@127.0.0.1:{port}/glmstack"}
    result = _glmstack(env, "keys", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("glmstack: error: database unavailable")
    assert "Traceback" not in result.stderr
