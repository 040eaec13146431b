"""Hybrid retrieval over knowledge bases: dense (the base's embedding model) and lexical (BM25 over jieba terms)
candidates, fused, optionally reranked.

Dense search carries paraphrase; lexical search carries exact names, numbers, and Chinese when the embedding
model does not read it (the bundled all-MiniLM-L6-v2 does not). Two fusions: relative scores (the default,
`fuse_scores`) and reciprocal rank fusion (Cormack et al., 2009: 1 / (RRF_K + rank) per list, `fuse`), which
ignores how confident each search is; BENCHMARKS.md compares them on the bilingual corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from glmstack.knowledge import segment
from glmstack.protocol import Embedder
from glmstack.store.knowledge import ChunkHit, KnowledgeStore

RRF_K = 60
CANDIDATES = 30  # per search, before fusion
Mode = Literal["hybrid", "dense", "lexical"]
Fusion = Literal["relative", "rrf"]
DENSE_WEIGHT = 0.5
# (question, hits) -> hits in a better order: the hook for a cross-encoder reranker
Reranker = Callable[[str, list[ChunkHit]], list[ChunkHit]]


@dataclass(frozen=True)
class RetrievalSettings:
    top_k: int = 5
    candidates: int = CANDIDATES
    mode: Mode = "hybrid"


class Retriever:
    """Searches one or more knowledge bases that share an embedding model."""

    def __init__(self, store: KnowledgeStore | object, embedder: Embedder | None,
                 reranker: Reranker | None = None, fusion: Fusion = "relative"):
        # a Store or its KnowledgeStore: benchmarks and the platform hold the former
        self.knowledge: KnowledgeStore = getattr(store, "knowledge", store)  # type: ignore[arg-type]
        self.embedder = embedder
        self.reranker = reranker
        self.fusion = fusion

    def search(self, knowledge_ids: str | Sequence[str], query: str, top_k: int = 5, mode: Mode = "hybrid",
               candidates: int = CANDIDATES) -> list[ChunkHit]:
        ids = [knowledge_ids] if isinstance(knowledge_ids, str) else list(knowledge_ids)
        pool = max(candidates, top_k)
        dense: list[ChunkHit] = []
        lexical: list[ChunkHit] = []
        if mode in ("hybrid", "dense") and self.embedder is not None:
            vector = self.embedder.embed([query]).vectors[0]
            dense = self.knowledge.dense_search(ids, vector, pool)
        if mode in ("hybrid", "lexical"):
            lexical = self.knowledge.lexical_search(ids, segment.query_terms(query), pool)
        if mode == "dense":
            hits = dense
        elif mode == "lexical":
            hits = lexical
        elif self.fusion == "rrf":
            hits = fuse([dense, lexical])
        else:
            hits = fuse_scores(dense, lexical)
        if self.reranker is not None:
            hits = self.reranker(query, hits)
        return hits[:top_k]


def fuse(rankings: Sequence[Sequence[ChunkHit]], k: int = RRF_K) -> list[ChunkHit]:
    """Reciprocal rank fusion; the fused score replaces each hit's own."""
    scores: dict[int, float] = {}
    first: dict[int, ChunkHit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (k + rank + 1)
            first.setdefault(hit.chunk_id, hit)
    ordered = sorted(scores, key=lambda chunk_id: -scores[chunk_id])
    return [replace(first[c], score=scores[c]) for c in ordered]


def fuse_scores(dense: Sequence[ChunkHit], lexical: Sequence[ChunkHit],
                dense_weight: float = DENSE_WEIGHT) -> list[ChunkHit]:
    """Relative score fusion: the dense cosine as it is plus the lexical score relative to the best one.
    Unlike rank fusion it keeps how *sure* each search is: a query the embedding model cannot read (Chinese for
    an English-only model) gets nearly equal cosines everywhere, so the lexical match decides; a paraphrase
    with no word in common gets no lexical score, so the cosine decides. A chunk one search did not return
    gets that search's lowest score."""
    best_lexical = max((h.score for h in lexical), default=0.0) or 1.0
    dense_score = {h.chunk_id: h.score for h in dense}
    lexical_score = {h.chunk_id: h.score / best_lexical for h in lexical}
    floor = min(dense_score.values(), default=0.0)
    hits = {h.chunk_id: h for h in [*dense, *lexical]}
    combined = {c: dense_weight * dense_score.get(c, floor) + (1 - dense_weight) * lexical_score.get(c, 0.0)
                for c in hits}
    ordered = sorted(combined, key=lambda c: (-combined[c], c))
    return [replace(hits[c], score=combined[c]) for c in ordered]
