"""Plain text (TXT, Markdown, CSV) decoded: a byte-order mark decides where there is one, else strict UTF-8,
else GB18030 (what Chinese Windows editors save; it is a superset of GBK and GB2312)."""

from __future__ import annotations

import codecs
from pathlib import Path

from glmstack.knowledge.extraction.results import MIME_TYPES, Extracted, ExtractionError, ExtractionLimits

BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose mark is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Every encoding here uses at most 4 bytes per character, so this many bytes always hold max_chars characters.
MAX_BYTES_PER_CHAR = 4


def extract_text(path: Path, kind: str, limits: ExtractionLimits) -> Extracted:
    with open(path, "rb") as stream:
        data = stream.read(limits.max_chars * MAX_BYTES_PER_CHAR + MAX_BYTES_PER_CHAR)
        more = bool(stream.read(1))
    text = decode(data, final=not more)
    text = text.replace("\r\n", "\n")
    truncated = more or len(text) > limits.max_chars
    return Extracted(text[:limits.max_chars], MIME_TYPES[kind], "", truncated)


def decode(data: bytes, final: bool = True) -> str:
    """The text of `data`, which may stop inside a character when `final` is False (a prefix of a file)."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return _decode_as(data, encoding, final)
    if b"\x00" in data:
        raise ExtractionError("malformed", "The file is not text (it contains NUL bytes).")
    for encoding in ("utf-8", "gb18030"):
        try:
            return _decode_as(data, encoding, final)
        except ExtractionError:
            continue
    raise ExtractionError("malformed", "The file is not text in UTF-8, UTF-16 or GB18030.")


def _decode_as(data: bytes, encoding: str, final: bool) -> str:
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    try:
        return decoder.decode(data, final=final)
    except UnicodeDecodeError as error:
        raise ExtractionError("malformed", f"The file is not valid {encoding} text: {error.reason}.") from error
