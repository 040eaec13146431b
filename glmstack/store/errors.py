"""Errors the store raises. The HTTP side maps them to its error envelope; nothing here knows about HTTP."""

from __future__ import annotations


class StoreError(Exception):
    """Base for every error the store raises on purpose."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached, or stayed busy past the timeout. Raised within seconds rather than
    hanging, so a request can fail fast with "retry later"."""
