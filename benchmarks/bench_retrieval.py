"""Retrieval quality and speed of glmstack's knowledge bases (issue 17), through the real store and retriever.

    python benchmarks/bench_retrieval.py [--database-url URL] [--model FOLDER] [--dimensions]
        [--chunks [N]] [--ingest-pdf]

Always: the bilingual corpus in tests/data/retrieval (corpus.jsonl, questions.jsonl) is indexed into one
knowledge base with `index_text` (chunked at sentence_size 300, embedded by the model), and every question is
asked in three modes of `Retriever.search`: dense (cosine over the embeddings), lexical (BM25 over jieba terms)
and hybrid (the two fused by the retriever's default relative-score fusion; `hybrid-rrf`: by reciprocal rank
fusion instead). Printed: ingestion time, recall@5 per language x mode, whether hybrid reaches the
issue's goal of 0.9 in each language, and every hybrid miss (question, expected document, documents returned).
Recall@5 is the share of questions with at least one of the top 5 chunks from an answer document.

--dimensions: what the embeddings API's size mapping costs in quality. The corpus chunks and the questions are
re-embedded and passed through `fit_vector` (glmstack/api/services/embeddings.py): the model's own size,
zero-padded to 512/1024/2048 (cosine is unchanged, so recall should be identical) and reduced to 256 by the
fixed projection; dense recall@5 per size and language, each size in its own knowledge base.

--chunks [N] (N defaults to 100000): retrieval latency at scale. N synthetic chunks (text of words drawn from
the corpus, random unit vectors of the model's size) are inserted with `add_chunks`, then 100 corpus questions
are searched in each mode; p50/p95 milliseconds per search (query embedding included) and insert rate.

--ingest-pdf: a 50-page English PDF (tests/make_files.py's make_pdf) from file to searchable chunks:
extraction (`glmstack.knowledge.extraction.extract`, its sandboxed child process) then `index_text`; seconds.

--database-url defaults to a SQLite file in a temporary folder; a postgresql:// URL (for example the one
`bash scripts/postgres.sh` prints) runs the same on PostgreSQL + pgvector. Knowledge bases the run created are
deleted at the end. Timings are printed, never judged: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmstack.engine.embeddings import bundled_embedding_model_dir, load_embedder  # noqa: E402
from glmstack.knowledge import segment  # noqa: E402
from glmstack.knowledge.indexer import index_text  # noqa: E402
from glmstack.knowledge.retrieval import Retriever  # noqa: E402
from glmstack.protocol import Embedder, EmbeddingBatch, EmbeddingModelInfo  # noqa: E402
from glmstack.store import Store  # noqa: E402

DATA = ROOT / "tests" / "data" / "retrieval"
MODES = ("dense", "lexical", "hybrid")
# what the quality table compares: (row, search mode, fusion); "hybrid" is the retriever's default fusion
ROWS = (("dense", "dense", "relative"), ("lexical", "lexical", "relative"), ("hybrid", "hybrid", "relative"),
        ("hybrid-rrf", "hybrid", "rrf"))
LANGS = ("zh", "en")
TOP_K = 5
GOAL = 0.9
LATENCY_QUERIES = 100


@dataclass
class Corpus:
    docs: list[dict]
    questions: list[dict]


def load_corpus() -> Corpus:
    def read(name: str) -> list[dict]:
        with open(DATA / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    return Corpus(read("corpus.jsonl"), read("questions.jsonl"))


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# ---- quality ----------------------------------------------------------------------------------------------


def index_corpus(store: Store, embedder: Embedder, corpus: Corpus) -> tuple[str, dict[str, str]]:
    """One knowledge base holding every corpus document; returns its id and {document id: corpus id}."""
    kid = store.knowledge.create_base(None, name="bench-retrieval", description="bilingual corpus")
    names: dict[str, str] = {}
    chunks = 0
    started = time.perf_counter()
    for doc in corpus.docs:
        text = doc["title"] + "\n" + doc["text"]
        document_id = store.knowledge.create_document(None, knowledge_id=kid, name=doc["id"], length=len(text))
        chunks += index_text(store, embedder, kid, document_id, text, sentence_size=300)
        names[document_id] = doc["id"]
    seconds = time.perf_counter() - started
    characters = sum(len(d["text"]) for d in corpus.docs)
    print(f"ingested {len(corpus.docs)} documents ({characters} characters) into {chunks} chunks in "
          f"{seconds:.1f} s ({chunks / seconds:.0f} chunks/s, chunk + embed + store)")
    return kid, names


def recall(retriever: Retriever, kid: str, names: dict[str, str], questions: list[dict],
           mode: str) -> tuple[dict[str, float], list[tuple[dict, list[str]]]]:
    """Recall@5 per language, and the questions missed with the corpus ids of what came back instead."""
    found: dict[str, list[bool]] = {lang: [] for lang in LANGS}
    misses = []
    for q in questions:
        got = [names.get(hit.document_id, "?") for hit in retriever.search(kid, q["question"], TOP_K, mode)]
        ok = any(g in q["answers"] for g in got)
        found[q["lang"]].append(ok)
        if not ok:
            misses.append((q, got))
    return {lang: sum(v) / len(v) for lang, v in found.items() if v}, misses


def quality(store: Store, embedder: Embedder, corpus: Corpus, kid: str, names: dict[str, str]) -> None:
    table, missed = {}, {}
    for row, mode, fusion in ROWS:
        retriever = Retriever(store, embedder, fusion=fusion)
        table[row], missed[row] = recall(retriever, kid, names, corpus.questions, mode)
    counts = {lang: sum(q["lang"] == lang for q in corpus.questions) for lang in LANGS}
    print(f"\nrecall@{TOP_K} ({counts['zh']} zh and {counts['en']} en questions, {len(corpus.docs)} documents)")
    print(f"{'mode':<11}" + "".join(f"{lang:>8}" for lang in LANGS))
    for row, _, _ in ROWS:
        print(f"{row:<11}" + "".join(f"{table[row][lang]:>8.3f}" for lang in LANGS))
    for lang in LANGS:
        met = "met" if table["hybrid"][lang] >= GOAL else "NOT met"
        print(f"goal hybrid >= {GOAL} in {lang}: {met} ({table['hybrid'][lang]:.3f})")
    for mode in ("dense", "lexical", "hybrid-rrf"):
        print(f"{mode} missed: {' '.join(q['id'] for q, _ in missed[mode]) or 'none'}")
    if missed["hybrid"]:
        print("\nhybrid misses (question -> expected; got):")
    for q, got in missed["hybrid"]:
        print(f"  {q['id']} {q['question']} -> {','.join(q['answers'])}; got {', '.join(got) or 'nothing'}")


# ---- the embeddings API's size mapping ----------------------------------------------------------------------


class FittedEmbedder:
    """The model's vectors passed through the embeddings API's size mapping, so the retriever searches with
    what a client asking for `size` dimensions would get."""

    def __init__(self, embedder: Embedder, size: int, fit: Callable[..., list[float]]):
        self.embedder, self.size, self.fit = embedder, size, fit

    def info(self) -> EmbeddingModelInfo:
        own = self.embedder.info()
        return EmbeddingModelInfo(own.name, self.size, own.max_tokens, own.matryoshka_dims)

    def embed(self, texts: list[str]) -> EmbeddingBatch:
        batch = self.embedder.embed(texts)
        dims = self.embedder.info().matryoshka_dims
        return EmbeddingBatch([self.fit(v, self.size, dims) for v in batch.vectors], batch.prompt_tokens)


def dimensions(store: Store, embedder: Embedder, corpus: Corpus, names: dict[str, str],
               created: list[str]) -> None:
    from glmstack.api.services.embeddings import fit_vector

    own = embedder.info().dimensions
    texts = {document_id: store.knowledge.document_chunks(document_id) for document_id in names}
    vectors = {document_id: embedder.embed(chunk_texts).vectors for document_id, chunk_texts in texts.items()}
    sizes = [(own, "model's own")] + [(s, "zero-padded") for s in (512, 1024, 2048) if s > own]
    sizes += [(s, "matryoshka" if s in embedder.info().matryoshka_dims else "fixed projection")
              for s in (256, 512) if s < own]
    print(f"\ndense recall@{TOP_K} by vector size ({embedder.info().name}, {own} dimensions)")
    print(f"{'size':>6} {'mapping':<18}" + "".join(f"{lang:>8}" for lang in LANGS))
    for size, how in sizes:
        fitted = FittedEmbedder(embedder, size, fit_vector)
        kid = store.knowledge.create_base(None, name=f"bench-dims-{size}")
        created.append(kid)
        renamed: dict[str, str] = {}
        for document_id, chunk_texts in texts.items():
            copy = store.knowledge.create_document(None, knowledge_id=kid, name=names[document_id], length=0)
            store.knowledge.add_chunks(copy, kid, [
                (i, t, segment.index_terms(t), fit_vector(v, size, embedder.info().matryoshka_dims))
                for i, (t, v) in enumerate(zip(chunk_texts, vectors[document_id], strict=True))])
            renamed[copy] = names[document_id]
        table, _ = recall(Retriever(store, fitted), kid, renamed, corpus.questions, "dense")
        print(f"{size:>6} {how:<18}" + "".join(f"{table[lang]:>8.3f}" for lang in LANGS))


# ---- latency at scale -------------------------------------------------------------------------------------


def synthesize(store: Store, embedder: Embedder, corpus: Corpus, count: int, created: list[str]) -> str:
    """A knowledge base of `count` chunks with corpus words as text and random unit vectors."""
    import numpy as np  # benchmark-only: the platform itself never imports numpy

    words = sorted({t for d in corpus.docs for t in segment.terms(d["text"])})
    rng, vectors_rng = random.Random(17), np.random.default_rng(17)
    size = embedder.info().dimensions
    kid = store.knowledge.create_base(None, name=f"bench-synthetic-{count}")
    created.append(kid)
    per_document, batch = 1000, 2000
    started = time.perf_counter()
    for first in range(0, count, per_document):
        n = min(per_document, count - first)
        document_id = store.knowledge.create_document(None, knowledge_id=kid, name=f"synthetic-{first}", length=0)
        for start in range(0, n, batch):
            m = min(batch, n - start)
            vectors = vectors_rng.standard_normal((m, size)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = []
            for i, vector in enumerate(vectors.tolist()):
                # 60 words, Chinese and English mixed as in the corpus: ~ a 300-character chunk's worth of terms
                text = " ".join(rng.choices(words, k=60))
                rows.append((start + i, text, segment.index_terms(text), vector))
            store.knowledge.add_chunks(document_id, kid, rows)
    seconds = time.perf_counter() - started
    print(f"\ninserted {count} synthetic chunks ({size}-dimensional) in {seconds:.1f} s ({count / seconds:.0f}/s)")
    return kid


def latency(store: Store, embedder: Embedder, corpus: Corpus, kid: str, dialect: str) -> None:
    queries = [q["question"] for q in corpus.questions]
    queries = (queries * (LATENCY_QUERIES // len(queries) + 1))[:LATENCY_QUERIES]
    retriever = Retriever(store, embedder)
    embed_ms = []
    for q in queries:
        started = time.perf_counter()
        embedder.embed([q])
        embed_ms.append((time.perf_counter() - started) * 1000)
    print(f"retrieval latency over {LATENCY_QUERIES} queries on {dialect} (ms per search, top {TOP_K}; "
          f"embedding one query alone: p50 {percentile(embed_ms, 50):.1f} ms)")
    print(f"{'mode':<10}{'p50':>10}{'p95':>10}")
    for mode in MODES:
        retriever.search(kid, queries[0], TOP_K, mode)  # warm caches and the connection pool
        times = []
        for q in queries:
            started = time.perf_counter()
            retriever.search(kid, q, TOP_K, mode)
            times.append((time.perf_counter() - started) * 1000)
        print(f"{mode:<10}{percentile(times, 50):>10.1f}{percentile(times, 95):>10.1f}")


# ---- PDF ingestion ----------------------------------------------------------------------------------------


def ingest_pdf(store: Store, embedder: Embedder, corpus: Corpus, scratch: Path, created: list[str]) -> None:
    from pypdf import PdfReader

    from glmstack.knowledge.extraction import extract

    sys.path.insert(0, str(ROOT / "tests"))
    from make_files import make_pdf

    english = [d["title"] + ". " + d["text"].replace("\n\n", " ") for d in corpus.docs if d["lang"] == "en"]
    # one page per paragraph of about 2,400 characters (two corpus documents): 50 full A4 pages
    pages = [english[(2 * i) % len(english)] + " " + english[(2 * i + 1) % len(english)] for i in range(50)]
    path = make_pdf(scratch / "handbook.pdf", [p[:2400] for p in pages], title="Handbook",
                    page_per_paragraph=True)
    page_count = len(PdfReader(path).pages)
    kid = store.knowledge.create_base(None, name="bench-pdf")
    created.append(kid)
    started = time.perf_counter()
    text = extract(path, "handbook.pdf").text
    extracted = time.perf_counter()
    document_id = store.knowledge.create_document(None, knowledge_id=kid, name="handbook.pdf",
                                                  length=path.stat().st_size)
    chunks = index_text(store, embedder, kid, document_id, text, sentence_size=300)
    done = time.perf_counter()
    hits = Retriever(store, embedder).search(kid, "hotel cap in high-cost cities", TOP_K)
    print(f"\nPDF ingestion: {page_count} pages, {path.stat().st_size // 1024} KiB, {len(text)} characters -> "
          f"{chunks} chunks in {done - started:.1f} s (extraction {extracted - started:.1f} s, chunk + embed + "
          f"store {done - extracted:.1f} s); searchable: {len(hits)} hits")


# ---- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a SQLite file in a temporary folder")
    parser.add_argument("--model", help="a sentence-transformers folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--dimensions", action="store_true", help="dense recall by embeddings API vector size")
    parser.add_argument("--chunks", type=int, nargs="?", const=100_000, default=0,
                        help="latency over N synthetic chunks (default N: 100000)")
    parser.add_argument("--ingest-pdf", action="store_true", help="time a 50-page PDF to searchable chunks")
    args = parser.parse_args()

    corpus = load_corpus()
    embedder = load_embedder(args.model or bundled_embedding_model_dir())
    with tempfile.TemporaryDirectory(prefix="glmstack-bench-retrieval-") as scratch:
        url = args.database_url or f"sqlite:///{scratch}/bench.db"
        created: list[str] = []
        with Store(url, home=Path(scratch)) as store:
            print(f"database: {store.dialect}; model: {embedder.info().name} ({embedder.info().dimensions} dims)")
            try:
                kid, names = index_corpus(store, embedder, corpus)
                created.append(kid)
                quality(store, embedder, corpus, kid, names)
                if args.dimensions:
                    dimensions(store, embedder, corpus, names, created)
                if args.ingest_pdf:
                    ingest_pdf(store, embedder, corpus, Path(scratch), created)
                if args.chunks:
                    kid = synthesize(store, embedder, corpus, args.chunks, created)
                    latency(store, embedder, corpus, kid, store.dialect)
            finally:
                for knowledge_id in created:  # a shared PostgreSQL keeps nothing from the run
                    store.knowledge.delete_base(None, knowledge_id)


if __name__ == "__main__":
    main()
