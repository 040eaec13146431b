"""PDF text with pypdf: page texts joined by newlines, the metadata title, encryption refused unless the
empty password opens it (many "protected" PDFs only restrict printing or copying)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from glmstack.knowledge.extraction.results import (
    MIME_TYPES,
    Extracted,
    ExtractionError,
    ExtractionLimits,
    TextCollector,
    is_out_of_memory,
)

if TYPE_CHECKING:
    from pypdf import PdfReader


def extract_pdf(path: Path, limits: ExtractionLimits) -> Extracted:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError) as error:
                raise ExtractionError(
                    "encrypted", f"The PDF is encrypted with a method that cannot be opened here: {error}.") from error
            if opened == PasswordType.NOT_DECRYPTED:
                raise ExtractionError(
                    "encrypted", "The PDF is protected by a password; upload a copy without a password.")
        page_count = len(reader.pages)
    except (ExtractionError, RecursionError):
        raise
    except Exception as error:  # pypdf raises many types on damaged files; all of them mean the same here
        if is_out_of_memory(error):
            raise
        raise ExtractionError("malformed", f"The file is not a readable PDF: {_describe(error)}.") from error

    collector = TextCollector(limits.max_chars)
    pages_read = 0
    failed_pages = 0
    for index in range(min(page_count, limits.max_pages)):
        try:
            page_text = reader.pages[index].extract_text()
        except RecursionError:
            raise
        except Exception as error:
            if is_out_of_memory(error):
                raise
            # One damaged page should not cost the reader the rest of the document.
            failed_pages += 1
            continue
        pages_read += 1
        if not collector.add(page_text):
            break
    if failed_pages and not pages_read:
        raise ExtractionError("malformed", f"None of the PDF's {page_count} pages could be read.")
    return Extracted(
        text=collector.text(),
        file_type=MIME_TYPES["pdf"],
        title=_title(reader),
        truncated=collector.truncated or page_count > limits.max_pages,
    )


def _title(reader: PdfReader) -> str:
    try:
        metadata = reader.metadata
        title = metadata.title if metadata is not None else None
    except Exception:  # a broken info dictionary is no reason to lose the text
        return ""
    return str(title).strip() if title else ""


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__
