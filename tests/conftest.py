"""Shared fixtures: the bundled model is loaded once per test session (it takes a few seconds); each test
that asks for `database_url` gets a fresh, empty database, once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def bundled():
    from glmstack import load

    model, tokenizer = load(device="cpu")
    return model, tokenizer


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A SQLAlchemy URL for an empty database of this test's own: a SQLite file in tmp_path, or a private
    schema in the PostgreSQL at $GLMSTACK_TEST_POSTGRES_URL (`scripts/postgres.sh` starts one and prints the
    URL; `.ci/run` exports it). The PostgreSQL half skips when the variable is unset."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'glmstack.db'}"
        return
    base = os.environ.get("GLMSTACK_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("GLMSTACK_TEST_POSTGRES_URL is not set; `bash scripts/postgres.sh` prints one")
    import sqlalchemy as sa

    from glmstack.store.db import normalize_url

    url = normalize_url(base)
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        # Every connection made with this URL sees only the new schema, so tests cannot see each other's rows.
        private = url.update_query_dict({"options": f"-csearch_path={schema}"})
        yield private.render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '10s'")
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    finally:
        admin.dispose()
