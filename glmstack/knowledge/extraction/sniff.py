"""What a file really is, from its first bytes. The client's filename only chooses among the plain-text types
(CSV, Markdown, text), which have no signature; a `.pdf` holding a DOCX is read as the DOCX it is."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from glmstack.knowledge.extraction.results import ExtractionError

HEAD_BYTES = 1024
# Readers accept "%PDF-" anywhere in the first kilobyte (some producers write a preamble before it); a file
# named as text must start with it, so a note that mentions the signature stays a note.
PDF_SIGNATURE = b"%PDF-"
ZIP_SIGNATURE = b"PK\x03\x04"
EMPTY_ZIP_SIGNATURE = b"PK\x05\x06"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# OLE2 compound files: legacy .doc/.xls/.ppt, and also password-protected .docx/.xlsx/.pptx (Office wraps an
# encrypted OOXML package in OLE2 with an EncryptionInfo stream).
OLE_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
OLE_ENCRYPTION_STREAM = "EncryptionInfo".encode("utf-16-le")
OLE_SCAN_BYTES = 1024 * 1024

TEXT_KINDS = {".csv": "csv", ".txt": "txt", ".md": "md"}
BINARY_NAMES = {".pdf": "PDF", ".docx": "DOCX", ".xlsx": "XLSX", ".pptx": "PPTX", ".png": "PNG", ".jpg": "JPEG",
                ".jpeg": "JPEG"}


def extension_of(filename: str) -> str:
    # A client filename may carry Windows separators; only its last component's suffix matters.
    return PurePosixPath(filename.replace("\\", "/")).suffix.lower()


def sniff(path: Path, filename: str) -> str:
    """One of "pdf", "zip" (an Office package, told apart by zip_guard), "png", "jpeg", "csv", "txt", "md";
    raises ExtractionError for empty, legacy-Office, unknown and mislabelled files."""
    with open(path, "rb") as stream:
        head = stream.read(HEAD_BYTES)
    if not head:
        raise ExtractionError("empty", "The file is empty (0 bytes).")
    extension = extension_of(filename)
    if head.startswith(PDF_SIGNATURE) or (PDF_SIGNATURE in head and extension not in TEXT_KINDS):
        return "pdf"
    if head.startswith(ZIP_SIGNATURE) or head.startswith(EMPTY_ZIP_SIGNATURE):
        return "zip"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if head.startswith(OLE_SIGNATURE):
        raise _ole_error(path)
    if extension in TEXT_KINDS:
        return TEXT_KINDS[extension]
    if extension in BINARY_NAMES:
        raise ExtractionError(
            "malformed", f"The file is named {extension} but its content is not a {BINARY_NAMES[extension]} file.")
    supported = ", ".join(sorted(set(TEXT_KINDS) | set(BINARY_NAMES)))
    raise ExtractionError(
        "unsupported", f"Unsupported file type {extension or '(no extension)'}; supported types are {supported}.")


def _ole_error(path: Path) -> ExtractionError:
    with open(path, "rb") as stream:
        start = stream.read(OLE_SCAN_BYTES)
    if OLE_ENCRYPTION_STREAM in start:
        return ExtractionError(
            "encrypted", "The Office document is protected by a password; save a copy without a password.")
    return ExtractionError(
        "unsupported",
        "Legacy Office files (.doc, .xls, .ppt) are not supported; save the document as .docx, .xlsx or .pptx.")
