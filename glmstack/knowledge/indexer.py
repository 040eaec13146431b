"""The background indexer: uploaded documents -> extracted text -> chunks -> vectors, one document at a time.

The queue is the database (`documents.embedding_stat = 0`), so a server killed mid-document carries on where it
stopped when it starts again: chunks already written are kept and only those still without a vector are
embedded; nothing is extracted or embedded twice. Chat never waits for it: it runs on its own thread, embeds in
small batches and yields between them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from glmstack.knowledge import segment
from glmstack.knowledge.chunking import chunk_document
from glmstack.protocol import Embedder
from glmstack.store.knowledge import Document, KnowledgeStore

log = logging.getLogger(__name__)

EMBED_BATCH = 16
# Per owner, as the platform's capacity answer reports them (spec §2.11.5): 5,000,000 characters and 1 GiB.
MAX_WORDS = 5_000_000
MAX_BYTES = 1024**3
# documents.fail_code values: the first two are the platform's (spec §6.2), the others ours.
SPACE_FULL, CHARACTERS_FULL, UNREADABLE, EMBEDDING_FAILED = 10001, 10002, 10003, 10004

# knowledge_bases.embedding_id -> the served embedding model. The documentation: "only embedding-2; 3 means
# embedding-2"; its own list example shows ids 1 and 2, so those are accepted as embedding-2 as well.
EMBEDDING_MODELS = {1: "embedding-2", 2: "embedding-2", 3: "embedding-2"}


def embedding_model_for(embedding_id: int) -> str | None:
    return EMBEDDING_MODELS.get(embedding_id)


def index_text(store: object, embedder: Embedder, knowledge_id: str, document_id: str, text: str,
               separators: list[str] | None = None, sentence_size: int = 300, knowledge_type: int = 1) -> int:
    """Chunk `text` into the document's chunks (replacing any) and embed them all; returns how many. The
    synchronous path, for imports and benchmarks; the Indexer does the same in the background."""
    knowledge: KnowledgeStore = getattr(store, "knowledge", store)  # type: ignore[arg-type]
    pieces = chunk_document(text, knowledge_type, separators, sentence_size)
    count = knowledge.replace_chunks(document_id, knowledge_id, [(p, segment.index_terms(p)) for p in pieces],
                                     word_num=len(text))
    embed_pending(knowledge, embedder, document_id)
    knowledge.finish_document(document_id)
    return count


def embed_pending(knowledge: KnowledgeStore, embedder: Embedder, document_id: str,
                  stop: threading.Event | None = None) -> bool:
    """Embeds the document's chunks that have no vector yet, a batch at a time; False if stopped early."""
    while not (stop and stop.is_set()):
        batch = knowledge.unembedded_chunks(document_id, EMBED_BATCH)
        if not batch:
            return True
        vectors = embedder.embed([t for _, t in batch]).vectors
        knowledge.set_embeddings([(chunk_id, v) for (chunk_id, _), v in zip(batch, vectors, strict=True)])
    return False


@dataclass
class IndexerStats:
    indexed: int = 0
    failed: int = 0


class Indexer:
    """Processes every pending document, on a daemon thread (`start`) or in the caller's (`run_pending`)."""

    def __init__(self, store: object, embedders: Mapping[str, Embedder], *, extraction_limits: object = None):
        self.store = store
        self.embedders = embedders
        self.extraction_limits = extraction_limits
        self.stats = IndexerStats()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one pass at a time, thread or caller

    @property
    def knowledge(self) -> KnowledgeStore:
        return self.store.knowledge  # type: ignore[attr-defined]

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="glmstack-indexer", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """There is new work: starts the thread if the app's start-up did not (an app served without its
        lifespan, as in tests)."""
        if not self._stop.is_set():
            self.start()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pending()
            except Exception:  # the database went away, say; try again on the next wake-up
                log.exception("the knowledge indexer failed a pass; retrying shortly")
            self._wake.wait(timeout=5.0)
            self._wake.clear()

    def run_pending(self) -> int:
        """Indexes pending documents until none are left (or stop() is called); returns how many it finished."""
        done = 0
        with self._lock:
            while not self._stop.is_set():
                pending = self.knowledge.pending_documents(limit=8)
                if not pending:
                    break
                for document in pending:
                    if self._stop.is_set():
                        break
                    self._index(document)
                    done += 1
        return done

    def _index(self, document: Document) -> None:
        model = embedding_model_for(self.knowledge.embedding_id_of(document.knowledge_id) or 0)
        embedder = self.embedders.get(model or "")
        if embedder is None:
            self._fail(document, EMBEDDING_FAILED, f"no embedding model is served for this knowledge base ({model})")
            return
        try:
            if self.knowledge.count_chunks(document.id) == 0 and not self._chunk(document):
                return
            if embed_pending(self.knowledge, embedder, document.id, self._stop):
                self.knowledge.finish_document(document.id)
                self.stats.indexed += 1
                log.info("indexed document %s (%s)", document.id, document.name)
        except Exception as e:  # a model error must not leave the document "vectorising" forever
            log.exception("embedding document %s failed", document.id)
            self._fail(document, EMBEDDING_FAILED, f"embedding failed: {e}")

    def _chunk(self, document: Document) -> bool:
        from glmstack.knowledge.extraction import ExtractionError, ExtractionLimits, extract

        if document.blob is None:
            self._fail(document, UNREADABLE, "the document's file is gone")
            return False
        path = self.store.blobs.path(document.blob)  # type: ignore[attr-defined]
        limits = self.extraction_limits or ExtractionLimits()
        try:
            text = extract(path, document.name, limits).text  # type: ignore[arg-type]
        except ExtractionError as e:
            self._fail(document, UNREADABLE, f"the document could not be read ({e.reason}): {e.message}")
            return False
        words, size = self.knowledge.usage(document.key_id)
        if size > MAX_BYTES:
            self._fail(document, SPACE_FULL, "知识不可用，知识库空间已达上限 (the knowledge space is full)")
            return False
        if words + len(text) > MAX_WORDS:
            self._fail(document, CHARACTERS_FULL, "知识不可用，知识库字数已达上限 (the character limit is reached)")
            return False
        pieces = chunk_document(text, document.knowledge_type, document.custom_separator, document.sentence_size)
        self.knowledge.replace_chunks(document.id, document.knowledge_id,
                                      [(p, segment.index_terms(p)) for p in pieces], word_num=len(text))
        if not pieces:
            self.knowledge.finish_document(document.id)  # an empty document is indexed: there is nothing in it
            return False
        return True

    def _fail(self, document: Document, code: int, message: str) -> None:
        self.knowledge.finish_document(document.id, failed=(code, message))
        self.stats.failed += 1
        log.warning("document %s (%s) failed: %s", document.id, document.name, message)
