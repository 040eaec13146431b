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


# --- conversations (the web page and `glmstack chat --conversation`) and durable jobs (issue 18) ------------

conversations = Table(
    "conversations", metadata,
    Column("id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=True),     # the owner; None: no key (open mode, the terminal)
    Column("title", String(200), nullable=False),
    Column("model", String(200), nullable=True),
    Column("system_prompt", Text, nullable=True),
    Column("settings", Text, nullable=True),         # JSON: temperature, top_p, max_tokens, knowledge_id, ...
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_conversations_key_updated", conversations.c.key_id, conversations.c.updated_at)

conversation_messages = Table(
    "conversation_messages", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("conversation_id", String(40), ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),     # 0, 1, 2, ... within the conversation
    Column("role", String(16), nullable=False),      # user | assistant | tool | system
    Column("content", Text, nullable=False, server_default=""),
    Column("reasoning_content", Text, nullable=True),
    Column("tool_calls", Text, nullable=True),       # JSON list, as the API returns them
    Column("meta", Text, nullable=True),             # JSON: model, usage, finish_reason, retrieval, ...
    Column("created_at", DateTime(timezone=True), nullable=False),
)
Index("uq_conversation_messages_position", conversation_messages.c.conversation_id,
      conversation_messages.c.position, unique=True)

# Async chat tasks (spec §2.3-2.4) and batches (§2.9) are the API's own rows; jobs/runner.py runs them, taking
# a lease (lease_owner, lease_until) so a second server on the same database never runs one twice and a
# killed server's work is taken up again once its lease runs out.
async_tasks = Table(
    "async_tasks", metadata,
    Column("id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=True),
    Column("request_id", String(128), nullable=False),
    Column("model", String(200), nullable=False),
    Column("body", Text, nullable=False),            # the chat request, JSON
    Column("status", String(16), nullable=False),    # PROCESSING | SUCCESS | FAIL
    Column("result", Text, nullable=True),           # JSON: choices, usage, created (SUCCESS) or error (FAIL)
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)
Index("ix_async_tasks_status", async_tasks.c.status, async_tasks.c.created_at)

batches = Table(
    "batches", metadata,
    Column("id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=True),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(40), nullable=False),
    Column("input_blob", String(64), nullable=True),  # kept until the batch ends, even if the file is deleted
    Column("completion_window", String(16), nullable=False),
    Column("metadata", Text, nullable=True),          # JSON object
    Column("auto_delete_input_file", Boolean, nullable=False, server_default="1"),
    Column("status", String(16), nullable=False),
    Column("output_file_id", String(40), nullable=True),
    Column("error_file_id", String(40), nullable=True),
    Column("errors", Text, nullable=True),            # JSON list of {code, line, message, param}
    Column("request_total", Integer, nullable=False, server_default="0"),
    Column("request_completed", Integer, nullable=False, server_default="0"),
    Column("request_failed", Integer, nullable=False, server_default="0"),
    # Unix seconds of each transition (the Batch object's own fields)
    Column("created_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger, nullable=True),
    Column("expires_at", BigInteger, nullable=True),
    Column("finalizing_at", BigInteger, nullable=True),
    Column("completed_at", BigInteger, nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("expired_at", BigInteger, nullable=True),
    Column("cancelling_at", BigInteger, nullable=True),
    Column("cancelled_at", BigInteger, nullable=True),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
)
Index("ix_batches_key_created", batches.c.key_id, batches.c.created_at)
Index("ix_batches_status", batches.c.status)

# One row per finished input line: what its output (or error) file line is. The primary key makes "every line
# once" a database fact: a line run again after a crash cannot be recorded twice.
batch_lines = Table(
    "batch_lines", metadata,
    Column("batch_id", String(40), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("line", Integer, primary_key=True),       # 1-based line number in the input file
    Column("ok", Boolean, nullable=False),           # True: output file; False: error file
    Column("record", Text, nullable=False),          # the JSONL record, as written to its file
)


# --- fine-tuning jobs (issue 19, spec §2.13) -----------------------------------------------------------------
# Run by the job runner like batches (a lease on the row); the training itself is a child process
# (`python -m glmstack.finetune`) whose checkpoints live under GLMSTACK_HOME/fine_tuning/<job id>/.

fine_tuning_jobs = Table(
    "fine_tuning_jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(32), nullable=True),
    Column("model", String(200), nullable=False),           # the base model as the request named it
    Column("fine_tuned_model", String(200), nullable=False),  # "ft:<base>:<suffix>:<8 chars>", unique
    Column("method", String(16), nullable=False),          # lora | ptuning
    Column("status", String(20), nullable=False),          # created validating_files queued running succeeded ...
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40), nullable=True),
    Column("training_blob", String(64), nullable=True),    # the job's own links to the files' bytes
    Column("validation_blob", String(64), nullable=True),
    Column("hyperparameters", Text, nullable=False),       # JSON, as resolved ("auto" -> numbers)
    Column("suffix", String(16), nullable=True),
    Column("request_id", String(128), nullable=True),
    Column("error", Text, nullable=True),                  # JSON {code, message, param}
    Column("trained_tokens", BigInteger, nullable=True),
    Column("result_files", Text, nullable=True),           # JSON list of file ids
    Column("model_deleted", Boolean, nullable=False, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, server_default="0"),  # seen by the runner holding it
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
)
Index("ix_fine_tuning_jobs_key_created", fine_tuning_jobs.c.key_id, fine_tuning_jobs.c.id)
Index("uq_fine_tuning_jobs_fine_tuned_model", fine_tuning_jobs.c.fine_tuned_model, unique=True)
Index("ix_fine_tuning_jobs_status", fine_tuning_jobs.c.status)

fine_tuning_events = Table(
    "fine_tuning_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("type", String(16), nullable=False),            # message | metrics
    Column("level", String(16), nullable=True),
    Column("message", Text, nullable=True),
    Column("data", Text, nullable=True),                   # JSON (metrics)
)
Index("ix_fine_tuning_events_job", fine_tuning_events.c.job_id, fine_tuning_events.c.id)
