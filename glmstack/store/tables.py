"""The database schema, as SQLAlchemy Core tables. Changing it means adding a migration under
migrations/versions/ as well; tests/test_store.py checks that the two agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    literal_column,
)

# Explicit constraint names, so later migrations can refer to them on both databases.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),       # the public `{id}` half of `{id}.{secret}`
    Column("name", String(200), nullable=False, server_default=""),
    Column("secret_hash", String(64), nullable=False),  # sha256 hex of the secret: what plain keys check
    # The secret itself, encrypted with Fernet under the server's master key (GLMSTACK_HOME/secret.key).
    # A hash is not enough: the documented JWT scheme signs tokens with HMAC-SHA256 keyed by the secret, and
    # verifying an HMAC needs the key. Sealing keeps a copied database file from yielding usable keys.
    Column("sealed_secret", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("concurrency_limit", Integer, nullable=True),  # None: the server-wide default
)

usage = Table(
    "usage", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=True),  # None: no key (auth off)
    Column("model", String(200), nullable=False),
    Column("day", Date, nullable=False),  # UTC
    Column("requests", BigInteger, nullable=False, server_default="0"),
    Column("prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("completion_tokens", BigInteger, nullable=False, server_default="0"),
)

# One row per (key, model, UTC day), which `UsageStore.record` upserts into. Both databases treat NULLs as
# distinct in a plain unique constraint, so requests without a key would each get a new row; indexing
# coalesce(key_id, '') makes "no key" one value. The '' must be literal SQL (not a bound parameter) for
# ON CONFLICT to recognise the index.
USAGE_KEY = func.coalesce(usage.c.key_id, literal_column("''"))
Index("uq_usage_key_model_day", USAGE_KEY, usage.c.model, usage.c.day, unique=True)
