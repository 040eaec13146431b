"""Office packages (.docx/.xlsx/.pptx are zip files of XML) checked before any library opens them.

Everything here is decided from the central directory and a bounded read of each member's first bytes:
the entry count, the declared sizes and compression ratios (a zip bomb declares what it will inflate to, and
zipfile never inflates a member past its declared size, so the libraries reading after us are bound by what
we checked), member names, and the XML prolog - a DTD is what external entities (XXE) and entity expansion
("billion laughs") need, and no Office document has one.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

from glmstack.knowledge.extraction.results import ExtractionError, ExtractionLimits

OFFICE_MAIN_TYPES = {
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml": "docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml": "xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation.main+xml": "pptx",
}
CONTENT_TYPES_MEMBER = "[Content_Types].xml"
CONTENT_TYPES_MAX_BYTES = 1024 * 1024
# Small members compress far better than 100:1 when they are repetitive XML; a ratio only signals a bomb once
# the member (or the whole package) inflates to something that costs memory.
RATIO_CHECK_FROM_BYTES = 1024 * 1024
# The prolog (XML declaration, comments, processing instructions, DOCTYPE) must end within this many bytes.
PROLOG_MAX_BYTES = 64 * 1024
END_OF_DIRECTORY = b"PK\x05\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_END_OF_DIRECTORY = b"PK\x06\x06"
MAX_COMMENT_BYTES = 65535
ENCODING_DECLARATION = re.compile(r"""^<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
# Encodings a byte-level scan reads faithfully; anything else (UTF-7, EBCDIC, UCS-4) could hide a DOCTYPE.
SCANNABLE_ENCODINGS = {"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1", "latin1", "utf-16",
                       "utf-16le", "utf-16be", "windows-1252", "cp1252"}
# First bytes of "<?xm" in encodings the scan cannot read: UCS-4 in its byte orders, and EBCDIC.
UNSCANNABLE_STARTS = (b"\x00\x00\x00\x3c", b"\x3c\x00\x00\x00", b"\x00\x00\x3c\x00", b"\x00\x3c\x00\x00",
                      b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00", b"\x4c\x6f\xa7\x94")


def check_office_zip(path: Path, limits: ExtractionLimits) -> str:
    """Returns "docx", "xlsx" or "pptx" for a package that passed every check; raises ExtractionError."""
    declared_entries = _declared_entry_count(path)
    if declared_entries is not None and declared_entries > limits.max_zip_entries:
        raise _too_many_entries(declared_entries, limits)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > limits.max_zip_entries:
                raise _too_many_entries(len(members), limits)
            _check_sizes(members, limits)
            _check_names_and_flags(members)
            kind = _office_kind(archive)
            for member in members:
                if not member.is_dir():
                    _check_xml_prolog(archive, member)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise ExtractionError("malformed", f"The file is not a readable zip package: {error}.") from error
    return kind


def _too_many_entries(count: int, limits: ExtractionLimits) -> ExtractionError:
    return ExtractionError(
        "zip_bomb", f"The package has {count} entries, more than the {limits.max_zip_entries} allowed.")


def _declared_entry_count(path: Path) -> int | None:
    """The entry count from the end-of-central-directory record, read before zipfile builds an object per
    entry (so a package declaring millions of entries is refused without that cost). None where the record is
    not found; zipfile then reports the damage."""
    with open(path, "rb") as stream:
        size = stream.seek(0, 2)
        tail_length = min(size, 22 + MAX_COMMENT_BYTES)
        stream.seek(size - tail_length)
        tail = stream.read(tail_length)
        record = tail.rfind(END_OF_DIRECTORY)
        if record < 0 or len(tail) < record + 22:
            return None
        entries = int.from_bytes(tail[record + 10:record + 12], "little")
        locator = record - 20
        if entries != 0xFFFF or locator < 0 or tail[locator:locator + 4] != ZIP64_LOCATOR:
            return entries
        # Zip64: the locator points at the zip64 record, which holds the 8-byte count at offset 32.
        stream.seek(int.from_bytes(tail[locator + 8:locator + 16], "little"))
        zip64_record = stream.read(56)
    if len(zip64_record) < 40 or not zip64_record.startswith(ZIP64_END_OF_DIRECTORY):
        return None
    return int.from_bytes(zip64_record[32:40], "little")


def _check_sizes(members: list[zipfile.ZipInfo], limits: ExtractionLimits) -> None:
    total = 0
    total_compressed = 0
    for member in members:
        if member.file_size > limits.max_member_bytes:
            raise ExtractionError(
                "zip_bomb", f"The package member {member.filename!r} inflates to {member.file_size} bytes, "
                f"more than the {limits.max_member_bytes} allowed.")
        if member.file_size > RATIO_CHECK_FROM_BYTES and \
                member.file_size > limits.max_ratio * max(member.compress_size, 1):
            raise ExtractionError(
                "zip_bomb", f"The package member {member.filename!r} is compressed "
                f"{member.file_size / max(member.compress_size, 1):.0f}:1, more than the "
                f"{limits.max_ratio:g}:1 allowed.")
        total += member.file_size
        total_compressed += member.compress_size
    if total > limits.max_total_bytes:
        raise ExtractionError(
            "zip_bomb", f"The package inflates to {total} bytes, more than the {limits.max_total_bytes} allowed.")
    if total > RATIO_CHECK_FROM_BYTES and total > limits.max_ratio * max(total_compressed, 1):
        raise ExtractionError(
            "zip_bomb", f"The package is compressed {total / max(total_compressed, 1):.0f}:1 overall, more than "
            f"the {limits.max_ratio:g}:1 allowed.")


def _check_names_and_flags(members: list[zipfile.ZipInfo]) -> None:
    for member in members:
        name = member.filename
        # Nothing is extracted to disk, but a package with such names is crafted, not saved by an editor.
        if name.startswith("/") or "\\" in name or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"):
            raise ExtractionError("malformed", f"The package has a member with an unsafe path: {name!r}.")
        if member.flag_bits & 0x1:
            raise ExtractionError("encrypted", f"The package member {name!r} is encrypted.")


def _office_kind(archive: zipfile.ZipFile) -> str:
    try:
        with archive.open(CONTENT_TYPES_MEMBER) as stream:
            content_types = stream.read(CONTENT_TYPES_MAX_BYTES).decode("utf-8", errors="replace")
    except KeyError:
        raise ExtractionError(
            "unsupported", "The file is a zip archive, not a .docx, .xlsx or .pptx document.") from None
    for main_type, kind in OFFICE_MAIN_TYPES.items():
        if main_type in content_types:
            return kind
    raise ExtractionError(
        "unsupported", "The zip package is not a Word (.docx), Excel (.xlsx) or PowerPoint (.pptx) document "
        "(macro-enabled and template variants are not supported).")


def _check_xml_prolog(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    with archive.open(member) as stream:
        head = stream.read(PROLOG_MAX_BYTES)
    text = _decode_xml_head(head, member.filename)
    if text is None:
        return
    if "<!DOCTYPE" in text or "<!ENTITY" in text or _prolog_declares_dtd(text, member.filename):
        raise ExtractionError(
            "malformed", f"The document contains a DTD/entity declaration (in {member.filename!r}), which is "
            "not allowed.")


def _decode_xml_head(head: bytes, name: str) -> str | None:
    """The member's first bytes as text where it is XML (None for images and other binary parts)."""
    if head.startswith(UNSCANNABLE_STARTS):
        raise ExtractionError("malformed", f"The package member {name!r} uses an unsupported XML encoding.")
    if head.startswith(b"\xef\xbb\xbf"):
        encoding, head = "utf-8", head[3:]
    elif head.startswith((b"\xff\xfe", b"<\x00")):
        encoding = "utf-16-le"
    elif head.startswith((b"\xfe\xff", b"\x00<")):
        encoding = "utf-16-be"
    elif head.lstrip().startswith(b"<"):
        encoding = "utf-8"
    else:
        return None
    text = head.decode(encoding, errors="replace").lstrip("\ufeff")
    declared = ENCODING_DECLARATION.match(text.lstrip())
    if declared and declared.group(1).lower() not in SCANNABLE_ENCODINGS:
        raise ExtractionError(
            "malformed", f"The package member {name!r} declares the XML encoding {declared.group(1)!r}, which is "
            "not allowed.")
    return text


def _prolog_declares_dtd(text: str, name: str) -> bool:
    """Walks the prolog (declaration, comments, processing instructions) up to the root element; any `<!`
    markup other than a comment there is a DOCTYPE, however it is spelled."""
    position = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if text.startswith("<?", position):
            end = text.find("?>", position + 2)
            position = -1 if end < 0 else end + 2
        elif text.startswith("<!--", position):
            end = text.find("-->", position + 4)
            position = -1 if end < 0 else end + 3
        elif text.startswith("<!", position):
            return True
        elif position < len(text):
            return False  # the root element (or junk the XML parser will refuse)
        else:
            position = -1
        if position < 0:
            raise ExtractionError(
                "malformed", f"The XML prolog of {name!r} is unterminated or longer than {PROLOG_MAX_BYTES} bytes.")
