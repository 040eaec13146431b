"""Files, knowledge bases, documents and chunks, with their vector and full-text search.

SQLite: chunk vectors are sqlite-vec BLOBs and `chunks_fts` is an FTS5 index (Porter-stemmed) over
`chunks.terms` (external content, kept in step by triggers). PostgreSQL: vectors are pgvector's `vector` and
the full-text index is a GIN index on `to_tsvector('english', terms)` (stemmed; Chinese terms pass through).
Where the server has no pgvector extension the column is bytea and knowledge bases answer with an error naming
the missing extension (chat and everything else still work).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

from glmstack.store.vector_type import Embedding

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)

SQLITE_FTS = [
    "CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, content='chunks', content_rowid='id', "
    "tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN "
    "INSERT INTO chunks_fts(rowid, terms) VALUES (new.id, new.terms); END",
    "CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN "
    "INSERT INTO chunks_fts(chunks_fts, rowid, terms) VALUES ('delete', old.id, old.terms); END",
    "CREATE TRIGGER chunks_fts_update AFTER UPDATE OF terms ON chunks BEGIN "
    "INSERT INTO chunks_fts(chunks_fts, rowid, terms) VALUES ('delete', old.id, old.terms); "
    "INSERT INTO chunks_fts(rowid, terms) VALUES (new.id, new.terms); END",
]


def _pgvector_available(bind: sa.Connection) -> bool:
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).scalar():
        return True
    if not bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).scalar():
        log.warning("this PostgreSQL has no pgvector extension: knowledge bases will be unavailable")
        return False
    bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
    return True


def upgrade() -> None:
    bind = op.get_bind()
    postgres = bind.dialect.name == "postgresql"
    embedding_type: sa.types.TypeEngine = Embedding()
    if postgres and not _pgvector_available(bind):
        embedding_type = sa.LargeBinary()

    op.create_table(
        "files",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("status_details", sa.Text(), nullable=True),
        sa.Column("blob", sa.String(64), nullable=False),
        sa.Column("file_type", sa.String(200), nullable=False, server_default=""),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("generated", sa.Boolean(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_key_purpose_created", "files", ["key_id", "purpose", "created_at"])
    op.create_table(
        "knowledge_bases",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("icon", sa.String(20), nullable=True),
        sa.Column("background", sa.String(20), nullable=True),
        sa.Column("embedding_id", sa.Integer(), nullable=False),
        sa.Column("customer_identifier", sa.String(64), nullable=True),
        sa.Column("bucket_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_knowledge_bases"),
    )
    op.create_index("ix_knowledge_bases_key", "knowledge_bases", ["key_id", "created_at"])
    op.create_table(
        "documents",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("knowledge_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("blob", sa.String(64), nullable=True),
        sa.Column("url", sa.Text(), nullable=False, server_default=""),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("word_num", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("knowledge_type", sa.Integer(), nullable=False),
        sa.Column("custom_separator", sa.Text(), nullable=True),
        sa.Column("sentence_size", sa.Integer(), nullable=False),
        sa.Column("embedding_stat", sa.Integer(), nullable=False),
        sa.Column("fail_code", sa.Integer(), nullable=True),
        sa.Column("fail_msg", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["knowledge_id"], ["knowledge_bases.id"], ondelete="CASCADE",
                                name="fk_documents_knowledge_id_knowledge_bases"),
        sa.PrimaryKeyConstraint("id", name="pk_documents"),
    )
    op.create_index("ix_documents_knowledge", "documents", ["knowledge_id", "created_at"])
    op.create_index("ix_documents_stat", "documents", ["embedding_stat"])
    op.create_table(
        "chunks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("document_id", sa.String(32), nullable=False),
        sa.Column("knowledge_id", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("terms", sa.Text(), nullable=False),
        sa.Column("embedding", embedding_type, nullable=True),
        sa.ForeignKeyConstraint(["document_id"], ["documents.id"], ondelete="CASCADE",
                                name="fk_chunks_document_id_documents"),
        sa.PrimaryKeyConstraint("id", name="pk_chunks"),
    )
    op.create_index("ix_chunks_knowledge", "chunks", ["knowledge_id"])
    op.create_index("ix_chunks_document", "chunks", ["document_id", "position"])
    if postgres:
        op.execute("CREATE INDEX ix_chunks_terms_fts ON chunks USING gin (to_tsvector('english', terms))")
    else:
        for statement in SQLITE_FTS:
            op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_chunks_terms_fts")
    else:
        for name in ("chunks_fts_insert", "chunks_fts_delete", "chunks_fts_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS chunks_fts")
    for table in ("chunks", "documents", "knowledge_bases", "files"):
        op.drop_table(table)
