"""Shared fixtures: the bundled model is loaded once per test session (it takes a few seconds); each test
that asks for `database_url` gets a fresh, empty database, once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import postgres_schema


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
    with postgres_schema() as url:
        yield url
