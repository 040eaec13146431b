"""Text to lexical terms for full-text search, the same way for indexing and for queries.

Chinese has no spaces, so a full-text index would see a whole sentence as one token: rjieba (jieba's dictionary
and output, in Rust) cuts it into words first, in search mode (long words also yield their parts, so "知识库"
matches "知识"). Terms are lower-cased and joined by spaces; the databases' own tokenizers then split on the
spaces and stem English (SQLite FTS5 `porter`, PostgreSQL `english`).
"""

from __future__ import annotations

import re

# Words that carry no meaning in a query; dropped from queries only (documents keep everything, so a phrase
# search could still use them). Short on purpose: BM25's IDF already discounts what is common in a corpus.
QUERY_STOPWORDS = frozenset(
    "的 了 是 在 和 与 及 或 吗 呢 吧 啊 么 什么 怎么 怎样 如何 多少 哪些 哪个 哪里 为什么 请问 一下 可以 能 会 有 "
    "我 我们 你 你们 他 她 它 这 那 这个 那个 就 都 也 还 要 想 对 把 被 给 从 到 上 下 中 "
    "a an the is are was were be been to of in on at for by with and or not do does did how what which who "
    "when where why can could should would will i you we they it this that these those my your our "
    "there their please tell me about any".split()
)
_WORDLIKE = re.compile(r"\w", re.UNICODE)


def _cut(text: str) -> list[str]:
    import rjieba  # imported on first use: loading its dictionary takes ~0.4 s

    return rjieba.cut_for_search(text)


def terms(text: str) -> list[str]:
    """The lexical terms of `text`, in order: words (Chinese segmented), lower-cased, punctuation and
    whitespace dropped."""
    return [t.lower() for t in _cut(text) if _WORDLIKE.search(t)]


def index_terms(text: str) -> str:
    """What the full-text index stores for a chunk."""
    return " ".join(terms(text))


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query worth matching, in order (stopwords dropped unless nothing else is left)."""
    seen: dict[str, None] = {}
    for term in terms(text):
        seen.setdefault(term, None)
    kept = [t for t in seen if t not in QUERY_STOPWORDS]
    return kept or list(seen)
