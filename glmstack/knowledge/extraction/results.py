"""What extraction returns, refuses with, and is bounded by; shared by the parent and the child process."""

from __future__ import annotations

import errno
from dataclasses import dataclass

# The file types extraction understands. The real type is sniffed from the bytes; the extension only chooses
# among the plain-text types, which have no magic bytes.
SUPPORTED_EXTENSIONS = (".pdf", ".docx", ".xlsx", ".pptx", ".csv", ".txt", ".md", ".png", ".jpg", ".jpeg")

MIME_TYPES = {
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "csv": "text/csv",
    "txt": "text/plain",
    "md": "text/markdown",
    "png": "image/png",
    "jpeg": "image/jpeg",
}

REASONS = frozenset({
    "unsupported", "encrypted", "malformed", "too_large", "zip_bomb", "timeout", "memory", "ocr_unavailable",
    "empty",
})

# How running out of the address-space cap shows when it is not a MemoryError: the dynamic loader failing to
# map a library, ENOMEM from the kernel, a C++ library (Tesseract) aborting on a failed allocation, libxml2
# (lxml) reporting one.
OUT_OF_MEMORY_SIGNS = ("failed to map segment", "Cannot allocate memory", "std::bad_alloc",
                       "Memory allocation failed")


@dataclass(frozen=True)
class ExtractionLimits:
    """Bounds on one extraction. memory_mb caps the child process's address space (the parsing libraries
    included, about 60 MB of it); timeout_s is wall-clock time, start-up included."""

    timeout_s: float = 60.0
    memory_mb: int = 1024
    max_chars: int = 2_000_000
    max_zip_entries: int = 10_000
    max_member_bytes: int = 200 * 1024 * 1024
    max_total_bytes: int = 500 * 1024 * 1024
    max_ratio: float = 100.0
    max_pages: int = 2000
    max_image_pixels: int = 40_000_000


@dataclass(frozen=True)
class Extracted:
    text: str
    file_type: str  # the MIME type of what the bytes are, whatever the client named the file
    title: str  # the document's own title (PDF / DOCX / PPTX / XLSX properties), else ""
    truncated: bool  # text stops at max_chars or max_pages


class ExtractionError(Exception):
    """A file that cannot be turned into text, with a reason code for callers and an English message for
    people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class TextCollector:
    """Joins text pieces with newlines, stopping at max_chars so a huge document costs no more than the cap."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.pieces: list[str] = []
        self.length = 0
        self.truncated = False

    def add(self, piece: str) -> bool:
        """Append one piece; False once the cap is reached (the caller stops reading)."""
        if self.truncated:
            return False
        separator = 1 if self.pieces else 0
        room = self.max_chars - self.length - separator
        if len(piece) > room:
            if room > 0:
                self.pieces.append(piece[:room])
                self.length += separator + room
            self.truncated = True
            return False
        self.pieces.append(piece)
        self.length += separator + len(piece)
        return True

    def text(self) -> str:
        return "\n".join(self.pieces)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or one it was raised from, is the memory cap showing."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, MemoryError) or getattr(current, "errno", None) == errno.ENOMEM:
            return True
        if any(sign in str(current) for sign in OUT_OF_MEMORY_SIGNS):
            return True
        current = current.__cause__ or current.__context__
    return False
