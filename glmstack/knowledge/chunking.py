"""Extracted text -> chunks, as the platform documents it (spec §6.3-6.4): split on `custom_separator`
(default: every "\\n"), then pieces are packed into chunks of at most `sentence_size` characters (20-2000,
default 300). A piece longer than that is cut at sentence ends first, then hard.

Spreadsheet knowledge (types 3 and 4, Q&A and product tables) is row-based instead: each row is one chunk,
prefixed by its sheet's header row, so "价格: 3999" stays next to the product it belongs to.
"""

from __future__ import annotations

import re

DEFAULT_SENTENCE_SIZE = 300
MIN_SENTENCE_SIZE, MAX_SENTENCE_SIZE = 20, 2000
DEFAULT_SEPARATORS = ("\n",)
TABLE_TYPES = (3, 4)  # 问答知识-表格, 商品库-表格

# A sentence ends after Chinese or Western end punctuation (keeping the punctuation with its sentence).
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=\.)\s+")


def split_text(text: str, separators: list[str] | tuple[str, ...] | None = None,
               sentence_size: int = DEFAULT_SENTENCE_SIZE) -> list[str]:
    """Chunks of at most `sentence_size` characters, in document order, none empty."""
    if not MIN_SENTENCE_SIZE <= sentence_size <= MAX_SENTENCE_SIZE:
        raise ValueError(f"sentence_size must be {MIN_SENTENCE_SIZE}-{MAX_SENTENCE_SIZE}, got {sentence_size}")
    pieces = [text]
    for separator in [s for s in (separators or DEFAULT_SEPARATORS) if s]:
        pieces = [part for piece in pieces for part in piece.split(separator)]
    parts = [part for piece in pieces if piece.strip() for part in _fit(piece.strip(), sentence_size)]
    return _pack(parts, sentence_size, "\n")


def _pack(parts: list[str], size: int, joiner: str) -> list[str]:
    """Consecutive parts (each at most `size`) joined into groups of at most `size` characters, in order."""
    groups: list[str] = []
    current = ""
    for part in parts:
        if current and len(current) + len(joiner) + len(part) <= size:
            current = f"{current}{joiner}{part}"
        else:
            if current:
                groups.append(current)
            current = part
    if current:
        groups.append(current)
    return groups


def _fit(piece: str, size: int) -> list[str]:
    """`piece` as parts no longer than `size`: whole sentences packed together, an overlong sentence cut."""
    if len(piece) <= size:
        return [piece]
    sentences = [s.strip() for s in _SENTENCE_END.split(piece) if s.strip()]
    cut = [sentence[i:i + size] for sentence in sentences for i in range(0, len(sentence), size)]
    return _pack(cut, size, " ")


def split_table(text: str, sentence_size: int = DEFAULT_SENTENCE_SIZE) -> list[str]:
    """One chunk per spreadsheet row (tab-separated, as extraction writes them), each written as
    "header: value" pairs from its sheet's first row; lines outside any table fall back to `split_text`."""
    chunks: list[str] = []
    header: list[str] | None = None
    loose: list[str] = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) < 2:  # a sheet's name or other prose: the next table row is a new header
            header = None
            if line.strip():
                loose.append(line)
            continue
        if header is None:
            header = [c.strip() for c in cells]
            continue
        pairs = [f"{h}: {c.strip()}" if h else c.strip()
                 for h, c in zip(header + [""] * len(cells), cells, strict=False) if c.strip()]
        if pairs:
            chunks.extend(_fit("；".join(pairs), MAX_SENTENCE_SIZE))
    if loose:
        chunks = split_text("\n".join(loose), None, sentence_size) + chunks
    return chunks


def chunk_document(text: str, knowledge_type: int, separators: list[str] | None,
                   sentence_size: int) -> list[str]:
    if knowledge_type in TABLE_TYPES:
        return split_table(text, sentence_size)
    return split_text(text, separators, sentence_size)
