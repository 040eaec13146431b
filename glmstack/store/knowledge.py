"""Knowledge bases, their documents and the documents' chunks, and the two searches over chunks.

Every read and write is scoped to the owner (`key_id`; None is the keyless open mode): one key never sees
another's bases. Searches run in the database itself: dense (sqlite-vec's `vec_distance_cosine` / pgvector's
`<=>`, exact scans over one base's chunks) and lexical (SQLite FTS5's BM25 / PostgreSQL's `ts_rank_cd`).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, and_, delete, func, insert, select, text, update

from glmstack.store.db import Database
from glmstack.store.errors import StoreError
from glmstack.store.ids import plausible_id
from glmstack.store.tables import chunks, documents, knowledge_bases
from glmstack.store.vector_type import pack_float32, vector_literal

VECTORISING, EMBEDDED, FAILED = 0, 1, 2  # documents.embedding_stat (spec §6.2)


class VectorsUnavailableError(StoreError):
    """The database cannot store or search vectors (no sqlite-vec, or a PostgreSQL without pgvector)."""


@dataclass(frozen=True)
class KnowledgeBase:
    id: str
    key_id: str | None
    name: str
    description: str
    icon: str | None
    background: str | None
    embedding_id: int
    customer_identifier: str | None
    bucket_id: str | None
    created_at: datetime
    word_num: int = 0
    length: int = 0
    document_size: int = 0


@dataclass(frozen=True)
class Document:
    id: str
    knowledge_id: str
    key_id: str | None
    name: str
    blob: str | None
    url: str
    length: int
    word_num: int
    knowledge_type: int
    custom_separator: list[str] | None
    sentence_size: int
    embedding_stat: int
    fail_code: int | None
    fail_msg: str | None
    created_at: datetime


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: int
    document_id: str
    position: int
    text: str
    score: float  # higher is better; dense: cosine similarity, lexical: the engine's relevance


def new_id() -> str:
    """19 digits, like the platform's ids ("1783017081630007296"): milliseconds then randomness, so ids sort
    roughly by creation and never collide in practice."""
    return f"{int(time.time() * 1000):013d}{secrets.randbelow(10**6):06d}"


def _owner(column: Any, key_id: str | None) -> Any:
    return column.is_(None) if key_id is None else column == key_id


def _document(row: Row) -> Document:
    m = row._mapping
    separators = json.loads(m["custom_separator"]) if m["custom_separator"] else None
    return Document(
        id=m["id"], knowledge_id=m["knowledge_id"], key_id=m["key_id"], name=m["name"], blob=m["blob"],
        url=m["url"], length=m["length"], word_num=m["word_num"], knowledge_type=m["knowledge_type"],
        custom_separator=separators, sentence_size=m["sentence_size"], embedding_stat=m["embedding_stat"],
        fail_code=m["fail_code"], fail_msg=m["fail_msg"], created_at=m["created_at"],
    )


class KnowledgeStore:
    def __init__(self, db: Database):
        self._db = db
        self._vectors: bool | None = None

    # ---- capability -----------------------------------------------------------------------------------

    def vectors_available(self) -> bool:
        """Whether this database can hold and search vectors; checked once."""
        if self._vectors is None:
            try:
                with self._db.read() as conn:
                    if self._db.dialect == "postgresql":
                        kind = conn.execute(text(
                            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                            "WHERE attrelid = 'chunks'::regclass AND attname = 'embedding'")).scalar()
                        self._vectors = kind == "vector"
                    else:
                        conn.execute(text("SELECT vec_version()"))
                        self._vectors = True
            except Exception:  # no sqlite-vec function / no pgvector column: say so where it is needed
                self._vectors = False
        return self._vectors

    def _require_vectors(self) -> None:
        if not self.vectors_available():
            needed = "the pgvector extension" if self._db.dialect == "postgresql" else "the sqlite-vec extension"
            raise VectorsUnavailableError(f"this database cannot store vectors: it needs {needed}")

    # ---- knowledge bases -----------------------------------------------------------------------------

    def create_base(self, key_id: str | None, *, name: str, description: str = "", embedding_id: int = 3,
                    icon: str | None = None, background: str | None = None,
                    customer_identifier: str | None = None, bucket_id: str | None = None) -> str:
        knowledge_id = new_id()
        with self._db.write() as conn:
            conn.execute(insert(knowledge_bases).values(
                id=knowledge_id, key_id=key_id, name=name, description=description, icon=icon,
                background=background, embedding_id=embedding_id, customer_identifier=customer_identifier,
                bucket_id=bucket_id, created_at=datetime.now(UTC)))
        return knowledge_id

    def _bases(self, conn: Any, condition: Any, *, offset: int = 0, limit: int | None = None) -> list[KnowledgeBase]:
        totals = (
            select(documents.c.knowledge_id, func.count().label("n"),
                   func.coalesce(func.sum(documents.c.word_num), 0).label("words"),
                   func.coalesce(func.sum(documents.c.length), 0).label("bytes"))
            .group_by(documents.c.knowledge_id).subquery()
        )
        query = (
            select(knowledge_bases, totals.c.n, totals.c.words, totals.c.bytes)
            .select_from(knowledge_bases.outerjoin(totals, totals.c.knowledge_id == knowledge_bases.c.id))
            .where(condition).order_by(knowledge_bases.c.created_at.desc(), knowledge_bases.c.id.desc())
            .offset(offset)
        )
        if limit is not None:
            query = query.limit(limit)
        bases = []
        for row in conn.execute(query):
            m = row._mapping
            bases.append(KnowledgeBase(
                id=m["id"], key_id=m["key_id"], name=m["name"], description=m["description"], icon=m["icon"],
                background=m["background"], embedding_id=m["embedding_id"],
                customer_identifier=m["customer_identifier"], bucket_id=m["bucket_id"],
                created_at=m["created_at"], word_num=int(m["words"] or 0), length=int(m["bytes"] or 0),
                document_size=int(m["n"] or 0)))
        return bases

    def get_base(self, key_id: str | None, knowledge_id: str) -> KnowledgeBase | None:
        if not plausible_id(knowledge_id):  # ids also come from request bodies (a retrieval tool's knowledge_id)
            return None
        with self._db.read() as conn:
            found = self._bases(conn, and_(knowledge_bases.c.id == knowledge_id,
                                           _owner(knowledge_bases.c.key_id, key_id)))
        return found[0] if found else None

    def list_bases(self, key_id: str | None, *, page: int = 1, size: int = 10) -> tuple[list[KnowledgeBase], int]:
        owner = _owner(knowledge_bases.c.key_id, key_id)
        with self._db.read() as conn:
            total = conn.execute(select(func.count()).select_from(knowledge_bases).where(owner)).scalar_one()
            return self._bases(conn, owner, offset=(page - 1) * size, limit=size), int(total)

    def update_base(self, key_id: str | None, knowledge_id: str, **values: Any) -> bool:
        allowed = {"name", "description", "embedding_id", "icon", "background"}
        changes = {k: v for k, v in values.items() if k in allowed and v is not None}
        with self._db.write() as conn:
            condition = and_(knowledge_bases.c.id == knowledge_id, _owner(knowledge_bases.c.key_id, key_id))
            if not changes:
                return conn.execute(select(knowledge_bases.c.id).where(condition)).first() is not None
            return conn.execute(update(knowledge_bases).where(condition).values(**changes)).rowcount > 0

    def delete_base(self, key_id: str | None, knowledge_id: str) -> list[str] | None:
        """Deletes the base, its documents and chunks; returns the documents' blobs for the caller to remove
        from disk (None: no such base)."""
        with self._db.write() as conn:
            condition = and_(knowledge_bases.c.id == knowledge_id, _owner(knowledge_bases.c.key_id, key_id))
            if conn.execute(select(knowledge_bases.c.id).where(condition)).first() is None:
                return None
            blobs = conn.execute(select(documents.c.blob).where(documents.c.knowledge_id == knowledge_id)
                                 ).scalars().all()
            # Explicit rather than ON DELETE CASCADE alone: SQLite enforces it only with foreign_keys on.
            conn.execute(delete(chunks).where(chunks.c.knowledge_id == knowledge_id))
            conn.execute(delete(documents).where(documents.c.knowledge_id == knowledge_id))
            conn.execute(delete(knowledge_bases).where(knowledge_bases.c.id == knowledge_id))
        return [b for b in blobs if b]

    def usage(self, key_id: str | None) -> tuple[int, int]:
        """(characters, bytes) of every document this owner has."""
        with self._db.read() as conn:
            row = conn.execute(select(func.coalesce(func.sum(documents.c.word_num), 0),
                                      func.coalesce(func.sum(documents.c.length), 0))
                               .where(_owner(documents.c.key_id, key_id))).one()
        return int(row[0]), int(row[1])

    # ---- documents -------------------------------------------------------------------------------------

    def create_document(self, key_id: str | None, *, knowledge_id: str, name: str, length: int,
                        knowledge_type: int = 1, custom_separator: list[str] | None = None,
                        sentence_size: int = 300, blob: str | None = None, url: str = "") -> str:
        document_id = new_id()
        with self._db.write() as conn:
            conn.execute(insert(documents).values(
                id=document_id, knowledge_id=knowledge_id, key_id=key_id, name=name, blob=blob, url=url,
                length=length, word_num=0, knowledge_type=knowledge_type,
                custom_separator=json.dumps(custom_separator, ensure_ascii=False) if custom_separator else None,
                sentence_size=sentence_size, embedding_stat=VECTORISING, created_at=datetime.now(UTC)))
        return document_id

    def get_document(self, key_id: str | None, document_id: str) -> Document | None:
        if not plausible_id(document_id):
            return None
        with self._db.read() as conn:
            row = conn.execute(select(documents).where(
                documents.c.id == document_id, _owner(documents.c.key_id, key_id))).first()
        return _document(row) if row else None

    def list_documents(self, key_id: str | None, knowledge_id: str, *, page: int = 1, limit: int = 10,
                       order: str = "desc") -> tuple[list[Document], int]:
        condition = and_(documents.c.knowledge_id == knowledge_id, _owner(documents.c.key_id, key_id))
        ordering = documents.c.created_at.asc() if order == "asc" else documents.c.created_at.desc()
        with self._db.read() as conn:
            total = conn.execute(select(func.count()).select_from(documents).where(condition)).scalar_one()
            rows = conn.execute(select(documents).where(condition).order_by(ordering, documents.c.id)
                                .offset((page - 1) * limit).limit(limit)).all()
        return [_document(r) for r in rows], int(total)

    def reconfigure_document(self, key_id: str | None, document_id: str, *, knowledge_type: int,
                             custom_separator: list[str] | None, sentence_size: int | None) -> bool:
        """New chunking settings: the document is queued to be chunked and embedded again."""
        values: dict[str, Any] = {"knowledge_type": knowledge_type, "embedding_stat": VECTORISING,
                                  "fail_code": None, "fail_msg": None}
        if custom_separator is not None:
            values["custom_separator"] = json.dumps(custom_separator, ensure_ascii=False)
        if sentence_size is not None:
            values["sentence_size"] = sentence_size
        with self._db.write() as conn:
            changed = conn.execute(update(documents).where(
                documents.c.id == document_id, _owner(documents.c.key_id, key_id)).values(**values)).rowcount
            if changed:
                conn.execute(delete(chunks).where(chunks.c.document_id == document_id))
        return changed > 0

    def delete_document(self, key_id: str | None, document_id: str) -> Document | None:
        with self._db.write() as conn:
            row = conn.execute(select(documents).where(
                documents.c.id == document_id, _owner(documents.c.key_id, key_id))).first()
            if row is None:
                return None
            conn.execute(delete(chunks).where(chunks.c.document_id == document_id))
            conn.execute(delete(documents).where(documents.c.id == document_id))
        return _document(row)

    def pending_documents(self, limit: int = 16) -> list[Document]:
        """Documents still to chunk or embed, oldest first, whoever owns them: the indexer's queue, which
        lives in the database so a restarted server carries on where it stopped."""
        with self._db.read() as conn:
            rows = conn.execute(select(documents).where(documents.c.embedding_stat == VECTORISING)
                                .order_by(documents.c.created_at, documents.c.id).limit(limit)).all()
        return [_document(r) for r in rows]

    def embedding_id_of(self, knowledge_id: str) -> int | None:
        with self._db.read() as conn:
            return conn.execute(select(knowledge_bases.c.embedding_id)
                                .where(knowledge_bases.c.id == knowledge_id)).scalar()

    def finish_document(self, document_id: str, *, word_num: int | None = None, failed: tuple[int, str] | None = None
                        ) -> None:
        values: dict[str, Any] = {"embedding_stat": FAILED if failed else EMBEDDED}
        if failed:
            values.update(fail_code=failed[0], fail_msg=failed[1])
        if word_num is not None:
            values["word_num"] = word_num
        with self._db.write() as conn:
            conn.execute(update(documents).where(documents.c.id == document_id).values(**values))

    # ---- chunks ------------------------------------------------------------------------------------------

    def replace_chunks(self, document_id: str, knowledge_id: str, pieces: Sequence[tuple[str, str]],
                       *, word_num: int) -> int:
        """The document's chunks, as (text, terms), replacing any it had (a resumed or re-chunked document);
        its character count is recorded at the same time. Returns how many."""
        with self._db.write() as conn:
            conn.execute(delete(chunks).where(chunks.c.document_id == document_id))
            if pieces:
                conn.execute(insert(chunks), [
                    {"document_id": document_id, "knowledge_id": knowledge_id, "position": i, "text": t,
                     "terms": terms, "embedding": None} for i, (t, terms) in enumerate(pieces)])
            conn.execute(update(documents).where(documents.c.id == document_id).values(word_num=word_num))
        return len(pieces)

    def add_chunks(self, document_id: str, knowledge_id: str,
                   rows: Iterable[tuple[int, str, str, list[float] | None]]) -> None:
        """Bulk insert of ready chunks (position, text, terms, embedding): for benchmarks and imports."""
        batch = [{"document_id": document_id, "knowledge_id": knowledge_id, "position": p, "text": t,
                  "terms": terms, "embedding": e} for p, t, terms, e in rows]
        if batch:
            with self._db.write() as conn:
                conn.execute(insert(chunks), batch)

    def unembedded_chunks(self, document_id: str, limit: int) -> list[tuple[int, str]]:
        with self._db.read() as conn:
            rows = conn.execute(select(chunks.c.id, chunks.c.text).where(
                chunks.c.document_id == document_id, chunks.c.embedding.is_(None))
                .order_by(chunks.c.position).limit(limit)).all()
        return [(r[0], r[1]) for r in rows]

    def count_chunks(self, document_id: str) -> int:
        with self._db.read() as conn:
            return conn.execute(select(func.count()).select_from(chunks)
                                .where(chunks.c.document_id == document_id)).scalar_one()

    def set_embeddings(self, vectors: Sequence[tuple[int, list[float]]]) -> None:
        self._require_vectors()
        with self._db.write() as conn:
            for chunk_id, vector in vectors:
                conn.execute(update(chunks).where(chunks.c.id == chunk_id).values(embedding=vector))

    def document_chunks(self, document_id: str) -> list[str]:
        with self._db.read() as conn:
            return list(conn.execute(select(chunks.c.text).where(chunks.c.document_id == document_id)
                                     .order_by(chunks.c.position)).scalars())

    # ---- search ------------------------------------------------------------------------------------------

    def dense_search(self, knowledge_ids: Sequence[str], vector: list[float], k: int) -> list[ChunkHit]:
        """The k chunks nearest to `vector` by cosine distance (an exact scan of the bases' chunks)."""
        self._require_vectors()
        ids = list(knowledge_ids)
        with self._db.read() as conn:
            if self._db.dialect == "postgresql":
                sql = text("SELECT id, document_id, position, text, embedding <=> CAST(:q AS vector) AS d "
                           "FROM chunks WHERE knowledge_id = ANY(:ids) AND embedding IS NOT NULL "
                           "ORDER BY d LIMIT :k")
                rows = conn.execute(sql, {"q": vector_literal(vector), "ids": ids, "k": k}).all()
            else:
                marks = ",".join(f":id{i}" for i in range(len(ids)))
                sql = text(f"SELECT id, document_id, position, text, vec_distance_cosine(embedding, :q) AS d "
                           f"FROM chunks WHERE knowledge_id IN ({marks}) AND embedding IS NOT NULL "
                           f"ORDER BY d LIMIT :k")
                params: dict[str, Any] = {f"id{i}": v for i, v in enumerate(ids)}
                rows = conn.execute(sql, {**params, "q": pack_float32(vector), "k": k}).all()
        return [ChunkHit(r[0], r[1], r[2], r[3], 1.0 - float(r[4])) for r in rows]

    def lexical_search(self, knowledge_ids: Sequence[str], query_terms: Sequence[str], k: int) -> list[ChunkHit]:
        """The k chunks that best match any of `query_terms`, by BM25 (FTS5's own on SQLite; on PostgreSQL,
        whose ts_rank has no inverse document frequency, computed from the full-text index: _postgres_bm25)."""
        if not query_terms:
            return []
        ids = list(knowledge_ids)
        with self._db.read() as conn:
            if self._db.dialect == "postgresql":
                return _postgres_bm25(conn, ids, query_terms, k)
            match = " OR ".join('"' + t.replace('"', '""') + '"' for t in query_terms)
            marks = ",".join(f":id{i}" for i in range(len(ids)))
            sql = text(f"SELECT c.id, c.document_id, c.position, c.text, bm25(chunks_fts) AS s "
                       # CROSS JOIN: SQLite then runs the full-text match first and looks up its rows, rather
                       # than matching every chunk of the base found by the knowledge-id index (28 s vs 0.1 s
                       # at 100k chunks)
                       f"FROM chunks_fts CROSS JOIN chunks c ON c.id = chunks_fts.rowid "
                       f"WHERE chunks_fts MATCH :q AND c.knowledge_id IN ({marks}) ORDER BY s LIMIT :k")
            params: dict[str, Any] = {f"id{i}": v for i, v in enumerate(ids)}
            rows = conn.execute(sql, {**params, "q": match, "k": k}).all()
        # FTS5's bm25() is lower-is-better; negated so every search reads higher-is-better
        return [ChunkHit(r[0], r[1], r[2], r[3], -float(r[4])) for r in rows]


# BM25's usual constants; term frequency is taken as 1 per matched term, which is what it nearly always is in
# chunks of a few hundred characters.
BM25_K1, BM25_B = 1.2, 0.75
TERM_CANDIDATES = 500   # a term in at most this many chunks brings them all in as candidates
DF_COUNT_CAP = 10_000   # document frequency counted up to this (a term that common scores ~0 anyway)


def _tsquery(term: str) -> str:
    return "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"


def _postgres_bm25(conn: Any, ids: list[str], query_terms: Sequence[str], k: int) -> list[ChunkHit]:
    """BM25 on PostgreSQL, whose ts_rank has no inverse document frequency (it ranks a chunk that repeats a
    common word above one holding the rare word asked about). From the GIN index: each term's document
    frequency, and the chunks of the rarer terms as candidates; then, for the candidates, exactly which query
    terms each contains (one tsvector per candidate), scored as BM25 with length normalization."""
    total = conn.execute(text("SELECT count(*) FROM chunks WHERE knowledge_id = ANY(:ids)"), {"ids": ids}).scalar()
    if not total:
        return []
    match = "knowledge_id = ANY(:ids) AND to_tsvector('english', terms) @@ to_tsquery('english', :q)"
    idf: dict[str, float] = {}
    pool: set[int] = set()
    rarest: tuple[int, list[int]] | None = None
    for term in query_terms:
        found = list(conn.execute(text(f"SELECT id FROM chunks WHERE {match} LIMIT :m"),
                                  {"ids": ids, "q": _tsquery(term), "m": TERM_CANDIDATES + 1}).scalars())
        df = len(found)
        if df > TERM_CANDIDATES:
            df = conn.execute(text(f"SELECT count(*) FROM (SELECT 1 FROM chunks WHERE {match} LIMIT :cap) AS m"),
                              {"ids": ids, "q": _tsquery(term), "cap": DF_COUNT_CAP}).scalar()
        else:
            pool.update(found)
        if df:
            idf[term] = math.log(1 + (total - df + 0.5) / (df + 0.5))
            if rarest is None or df < rarest[0]:
                rarest = (df, found)
    if not pool and rarest is not None:  # every term is common: the candidates of the least common one
        pool.update(rarest[1][:TERM_CANDIDATES])
    if not pool:
        return []
    terms = list(idf)
    tests = ", ".join(f"v @@ to_tsquery('english', :t{i})" for i in range(len(terms)))
    rows = conn.execute(text(
        f"SELECT c.id, c.document_id, c.position, c.text, c.terms, {tests} FROM chunks c "
        f"CROSS JOIN LATERAL to_tsvector('english', c.terms) AS v WHERE c.id = ANY(:pool)"),
        {"pool": list(pool), **{f"t{i}": _tsquery(t) for i, t in enumerate(terms)}}).all()
    lengths = {row[0]: len(row[4].split()) for row in rows}
    average = sum(lengths.values()) / len(lengths)
    scored = []
    for row in rows:
        norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths[row[0]] / average)
        score = sum(idf[t] * (BM25_K1 + 1) / (1 + norm) for t, hit in zip(terms, row[5:], strict=True) if hit)
        scored.append(ChunkHit(row[0], row[1], row[2], row[3], score))
    scored.sort(key=lambda hit: (-hit.score, hit.chunk_id))
    return scored[:k]
