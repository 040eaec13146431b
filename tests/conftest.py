"""Shared fixtures: the bundled model is loaded once per test session (it takes a few seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundled():
    from glmstack import load

    model, tokenizer = load(device="cpu")
    return model, tokenizer
