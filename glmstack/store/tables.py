"""The database schema, as SQLAlchemy Core tables. Changing it means adding a migration under
migrations/versions/ as well; tests/test_store.py checks that the two agree."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
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

from glmstack.store.vector_type import Embedding

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


# --- files, knowledge bases, documents and their chunks (issue 17) ---------------------------------------------
# Ids are generated (a client's filename is only ever a display name); blobs live under GLMSTACK_HOME/files/
# named by `blob`, written by store/blobs.py.

files = Table(
    "files", metadata,
    Column("id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=True),   # the owner; None: uploaded with no key (open mode)
    Column("purpose", String(20), nullable=False),  # fine-tune | batch | file-extract (retrieval -> documents)
    Column("filename", String(512), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("status", String(20), nullable=False),   # "processed" | "error"
    Column("status_details", Text, nullable=True),
    Column("blob", String(64), nullable=False),
    Column("file_type", String(200), nullable=False, server_default=""),  # MIME type
    # file-extract: the extracted text (served by GET /files/{id}/content), extracted once at upload
    Column("content", Text, nullable=True),
    Column("title", Text, nullable=True),
    # batch output/error files are made by the server, not uploaded (issue 18)
    Column("generated", Boolean, nullable=False, server_default="0"),
)
Index("ix_files_key_purpose_created", files.c.key_id, files.c.purpose, files.c.created_at)

knowledge_bases = Table(
    "knowledge_bases", metadata,
    Column("id", String(32), primary_key=True),      # digits, as the platform's are
    Column("key_id", String(32), nullable=True),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("icon", String(20), nullable=True),
    Column("background", String(20), nullable=True),
    Column("embedding_id", Integer, nullable=False),
    Column("customer_identifier", String(64), nullable=True),
    Column("bucket_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_knowledge_bases_key", knowledge_bases.c.key_id, knowledge_bases.c.created_at)

documents = Table(
    "documents", metadata,
    Column("id", String(32), primary_key=True),
    Column("knowledge_id", String(32), ForeignKey("knowledge_bases.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("name", String(512), nullable=False),
    Column("blob", String(64), nullable=True),       # None once the source file is no longer kept
    Column("url", Text, nullable=False, server_default=""),
    Column("length", BigInteger, nullable=False),    # bytes of the uploaded file
    Column("word_num", BigInteger, nullable=False, server_default="0"),  # characters of extracted text
    Column("knowledge_type", Integer, nullable=False),
    Column("custom_separator", Text, nullable=True),  # JSON list of strings; None: the default ("\n")
    Column("sentence_size", Integer, nullable=False),
    Column("embedding_stat", Integer, nullable=False),  # 0 vectorising, 1 done, 2 failed (spec 6.2)
    Column("fail_code", Integer, nullable=True),
    Column("fail_msg", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("ix_documents_knowledge", documents.c.knowledge_id, documents.c.created_at)
Index("ix_documents_stat", documents.c.embedding_stat)

chunks = Table(
    "chunks", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("document_id", String(32), ForeignKey("documents.id", ondelete="CASCADE"), nullable=False),
    Column("knowledge_id", String(32), nullable=False),
    Column("position", Integer, nullable=False),
    Column("text", Text, nullable=False),
    # the text as lexical terms separated by spaces (Chinese segmented by rjieba, lower-cased): what the
    # full-text index (SQLite FTS5 / PostgreSQL tsvector) indexes
    Column("terms", Text, nullable=False),
    Column("embedding", Embedding(), nullable=True),  # None until the indexer has embedded it
)
Index("ix_chunks_knowledge", chunks.c.knowledge_id)
Index("ix_chunks_document", chunks.c.document_id, chunks.c.position)
