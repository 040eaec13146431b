"""The `embedding` column type: pgvector's `vector` on PostgreSQL, sqlite-vec's float32 BLOB on SQLite.

Both databases then search in SQL: `embedding <=> :query` (pgvector) and `vec_distance_cosine(embedding,
:query)` (sqlite-vec). The column carries no fixed size, so one table holds every knowledge base whatever its
embedding model; searches are exact scans over one base's chunks (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import struct
from typing import Any

from sqlalchemy import LargeBinary
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine, UserDefinedType


class PgVector(UserDefinedType):
    """pgvector's `vector` (no fixed dimension), written and read as its text form `[1,2,3]`."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "vector"


def pack_float32(vector: list[float]) -> bytes:
    """sqlite-vec's vector BLOB: little-endian float32s."""
    return struct.pack(f"<{len(vector)}f", *vector)


def unpack_float32(blob: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(blob) // 4}f", blob))


def vector_literal(vector: list[float]) -> str:
    """pgvector's text form."""
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


class Embedding(TypeDecorator):
    """A list of floats in, a list of floats out, on either database."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(PgVector())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            return vector_literal(value)
        return pack_float32(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if dialect.name == "postgresql":
            text = value if isinstance(value, str) else str(value)
            return [float(x) for x in text.strip("[]").split(",") if x]
        return unpack_float32(bytes(value))
