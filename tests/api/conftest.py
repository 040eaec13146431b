"""Fixtures for the in-process HTTP tests: a real store (SQLite and PostgreSQL, via `database_url`), the
scripted engine, and clients of apps built on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scripted import ScriptedEngine

from glmstack.api import create_app
from glmstack.protocol import Embedder
from glmstack.settings import Settings
from glmstack.store import Store


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    with Store(database_url, home=tmp_path) as s:
        yield s


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture(scope="session")
def bundled_embedder() -> Embedder:
    """The bundled all-MiniLM-L6-v2 on our encoder, loaded once per session (about a second)."""
    from glmstack.engine.embeddings import bundled_embedding_model_dir, load_embedder

    return load_embedder(bundled_embedding_model_dir())


@pytest.fixture
def make_client(store: Store, engine: ScriptedEngine, bundled_embedder: Embedder, tmp_path: Path):
    made: list[TestClient] = []
    embedders = {"embedding-2": bundled_embedder, "embedding-3": bundled_embedder}  # as `glmstack serve` has them

    def make(**overrides: Any) -> TestClient:
        settings = Settings(home=tmp_path, database_url="unused", **overrides)
        app = create_app(settings, engine, store, embedders=embedders)
        made.append(TestClient(app, raise_server_exceptions=False))
        return made[-1]

    yield make
    for c in made:  # as at the app's shutdown: usage still being written lands before the store goes
        c.app.state.platform.usage.close()
        c.app.state.platform.indexer.stop()


@pytest.fixture
def key(store: Store) -> str:
    return store.keys.create("tests")[1]


@pytest.fixture
def client(make_client, key: str) -> TestClient:
    c = make_client()
    c.headers["Authorization"] = f"Bearer {key}"
    return c

