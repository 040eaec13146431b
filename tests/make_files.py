"""Real files for extraction tests, written by the libraries that produce them in the wild (fpdf2, pypdf,
python-docx, openpyxl, python-pptx, Pillow), plus hostile packages built byte by byte.

Chinese text needs a CJK font only where it is drawn (PDF, PNG): `cjk_font()` finds one on the system or
returns None, and `make_pdf` / `make_png` refuse Chinese without one (callers then use English).
"""

from __future__ import annotations

import csv
import functools
import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

FONT_FOLDERS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
# File names of fonts with Chinese glyphs that Debian/Ubuntu and macOS-like systems ship.
CJK_FONT_NAMES = ("wqy-microhei", "wqy-zenhei", "notosanscjk", "notoserifcjk", "sourcehansans", "droidsansfallback",
                  "uming", "ukai")
DOCX_MAIN = "application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"
DOCX_CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="xml" ContentType="application/xml"/>'
    f'<Override PartName="/word/document.xml" ContentType="{DOCX_MAIN}"/></Types>'
)


@functools.cache
def cjk_font() -> Path | None:
    """A TrueType/OpenType font with Chinese glyphs (e.g. Debian's fonts-wqy-microhei), or None."""
    for folder in FONT_FOLDERS:
        if not folder.is_dir():
            continue
        for font in sorted(folder.rglob("*")):
            normalized = font.name.lower().replace("-", "").replace("_", "")
            if font.suffix.lower() in (".ttf", ".ttc", ".otf") and any(
                    name.replace("-", "") in normalized for name in CJK_FONT_NAMES):
                return font
    return None


def has_chinese(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


def _font_for(texts: Sequence[str]) -> Path | None:
    if not any(has_chinese(text) for text in texts):
        return None
    font = cjk_font()
    if font is None:
        raise ValueError("Chinese text needs a CJK font and none is installed (e.g. fonts-wqy-microhei)")
    return font


def make_pdf(path: Path, paragraphs: list[str], *, title: str = "", page_per_paragraph: bool = False) -> Path:
    """A text PDF (fpdf2): paragraphs flow over A4 pages, or one page each."""
    from fpdf import FPDF

    pdf = FPDF()
    font = _font_for(paragraphs + [title])
    if font is not None:
        pdf.add_font("cjk", fname=str(font))
        pdf.set_font("cjk", size=12)
    else:
        pdf.set_font("helvetica", size=12)
    if title:
        pdf.set_title(title)
    pdf.add_page()
    for index, paragraph in enumerate(paragraphs):
        if page_per_paragraph and index:
            pdf.add_page()
        pdf.multi_cell(0, 7, paragraph, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)
    pdf.output(str(path))
    return Path(path)


def make_encrypted_pdf(path: Path, paragraphs: list[str], password: str = "secret") -> Path:
    """A PDF that needs `password` to open (pypdf, AES-256)."""
    from pypdf import PdfReader, PdfWriter

    plain = make_pdf(Path(path).with_suffix(".plain.pdf"), paragraphs)
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="AES-256")
    with open(path, "wb") as stream:
        writer.write(stream)
    plain.unlink()
    return Path(path)


def make_docx(path: Path, paragraphs: list[str], table: list[list[str]] | None = None, title: str = "") -> Path:
    """A Word document (python-docx): the paragraphs, then the table (if any), then a closing paragraph
    "End of document." - so document order can be checked."""
    from docx import Document

    document = Document()
    document.core_properties.title = title
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=max(len(row) for row in table))
        for row_cells, row in zip(grid.rows, table, strict=True):
            for cell, text in zip(row_cells.cells, row, strict=False):
                cell.text = text
        document.add_paragraph("End of document.")
    document.save(str(path))
    return Path(path)


def make_xlsx(path: Path, sheets: dict[str, list[list[object]]], title: str = "") -> Path:
    """An Excel workbook (openpyxl): one sheet per entry, rows as given."""
    from openpyxl import Workbook

    workbook = Workbook()
    workbook.remove(workbook.active)
    workbook.properties.title = title or None
    for name, rows in sheets.items():
        sheet = workbook.create_sheet(name)
        for row in rows:
            sheet.append(row)
    workbook.save(str(path))
    return Path(path)


def make_pptx(path: Path, slides: list[tuple[str, str]], notes: list[str] | None = None,
              table: list[list[str]] | None = None, title: str = "") -> Path:
    """A PowerPoint deck (python-pptx): one (heading, body) slide each, speaker notes per slide where given,
    and the table (if any) on a last slide of its own."""
    from pptx import Presentation
    from pptx.util import Inches

    presentation = Presentation()
    presentation.core_properties.title = title
    for index, (heading, body) in enumerate(slides):
        slide = presentation.slides.add_slide(presentation.slide_layouts[1])
        slide.shapes.title.text = heading
        slide.placeholders[1].text = body
        if notes and index < len(notes):
            slide.notes_slide.notes_text_frame.text = notes[index]
    if table:
        slide = presentation.slides.add_slide(presentation.slide_layouts[5])
        shape = slide.shapes.add_table(len(table), max(len(row) for row in table), Inches(0.5), Inches(1.5),
                                       Inches(8), Inches(3))
        for row_index, row in enumerate(table):
            for column_index, text in enumerate(row):
                shape.table.cell(row_index, column_index).text = text
    presentation.save(str(path))
    return Path(path)


def make_csv(path: Path, rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", encoding=encoding, newline="") as stream:
        csv.writer(stream).writerows(rows)
    return Path(path)


def make_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    Path(path).write_bytes(text.encode(encoding))
    return Path(path)


def make_png(path: Path, lines: list[str], font_size: int = 40) -> Path:
    """Black text on white (Pillow), a line per entry, large enough for OCR."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = _font_for(lines)
    if font_path is None:
        dejavu = sorted(p for folder in FONT_FOLDERS if folder.is_dir() for p in folder.rglob("DejaVuSans.ttf"))
        font_path = dejavu[0] if dejavu else None
    font = ImageFont.truetype(str(font_path), font_size) if font_path else ImageFont.load_default(font_size)
    margin = font_size
    line_height = int(font_size * 1.6)
    width = max(int(font.getlength(line)) for line in lines) + 2 * margin
    image = Image.new("RGB", (width, line_height * len(lines) + 2 * margin), "white")
    draw = ImageDraw.Draw(image)
    for index, line in enumerate(lines):
        draw.text((margin, margin + index * line_height), line, fill="black", font=font)
    image.save(path)
    return Path(path)


def make_ole(path: Path, encrypted_package: bool = False) -> Path:
    """The start of an OLE2 compound file: a legacy Office (.doc/.xls/.ppt) document, or with
    `encrypted_package` what Office saves for a password-protected .docx/.xlsx/.pptx (a directory entry named
    EncryptionInfo)."""
    header = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(16) + struct.pack("<HHH", 0x3E, 3, 0xFFFE)
    directory = "EncryptionInfo".encode("utf-16-le") if encrypted_package else "WordDocument".encode("utf-16-le")
    Path(path).write_bytes(header.ljust(512, b"\x00") + directory.ljust(128, b"\x00") + bytes(4096))
    return Path(path)


def _raw_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> Path:
    """A zip written byte by byte from (name, method, stored payload, crc32, uncompressed size), so a member
    can declare what a real compressor never had to produce."""
    with open(path, "wb") as stream:
        central = b""
        for name, method, payload, crc, size in members:
            offset = stream.tell()
            encoded = name.encode()
            stream.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(payload), size,
                                     len(encoded), 0) + encoded)
            stream.write(payload)
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(payload),
                                   size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded
        directory_offset = stream.tell()
        stream.write(central)
        stream.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                                 directory_offset, 0))
    return Path(path)


def make_zip_bomb(path: Path, inflated_bytes: int = 1 << 30) -> Path:
    """A docx-like package whose word/document.xml inflates to `inflated_bytes` of zeros (a real deflate
    stream, ~1000:1), built without compressing them: after a full flush the compressor's state is reset, so
    every megabyte of zeros compresses to the same bytes, which are repeated."""
    megabyte = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(megabyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(megabyte) + compressor.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "the compressor did not reset at the full flush"
    count = inflated_bytes // len(megabyte)
    payload = block * count + compressor.flush()
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(megabyte, crc)
    content_types = DOCX_CONTENT_TYPES.encode()
    return _raw_zip(path, [
        ("[Content_Types].xml", zipfile.ZIP_STORED, content_types, zlib.crc32(content_types), len(content_types)),
        ("word/document.xml", zipfile.ZIP_DEFLATED, payload, crc, count * len(megabyte)),
    ])


def make_many_entries_zip(path: Path, entries: int) -> Path:
    """A docx-like package of `entries` members (the content types plus tiny parts)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("[Content_Types].xml", DOCX_CONTENT_TYPES)
        for index in range(entries - 1):
            archive.writestr(f"word/media/part{index}.bin", b"x")
    return Path(path)


def with_member_replaced(source: Path, path: Path, member: str, content: bytes) -> Path:
    """A copy of the package at `source` with one member's bytes replaced."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in original.infolist():
            copy.writestr(info.filename, content if info.filename == member else original.read(info))
    return Path(path)


def with_member_added(source: Path, path: Path, member: str, content: bytes) -> Path:
    """A copy of the package at `source` with one more member (its name is written as given, `..` and all)."""
    Path(path).write_bytes(Path(source).read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(member, content)
    return Path(path)


def make_xxe_docx(path: Path, target: str = "/etc/passwd") -> Path:
    """A DOCX whose document.xml declares an external entity for `target` and uses it in the first paragraph
    (an XXE attack: a resolving parser would put the file's contents into the text)."""
    plain = make_docx(Path(path).with_suffix(".plain.docx"), ["Before the entity: ENTITY_HERE"])
    with zipfile.ZipFile(plain) as archive:
        xml = archive.read("word/document.xml").decode()
    declaration_end = xml.index("?>") + 2
    doctype = f'\n<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "file://{target}">]>'
    hostile = (xml[:declaration_end] + doctype + xml[declaration_end:]).replace("ENTITY_HERE", "&xxe;")
    with_member_replaced(plain, Path(path), "word/document.xml", hostile.encode())
    plain.unlink()
    return Path(path)


def make_billion_laughs_xlsx(path: Path) -> Path:
    """An XLSX whose first sheet expands nested internal entities (exponential entity expansion)."""
    plain = make_xlsx(Path(path).with_suffix(".plain.xlsx"), {"Sheet": [["laugh"]]})
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{level} "{f"&lol{level - 1};" * 10}">' for level in range(1, 10))
    member = "xl/worksheets/sheet1.xml"
    with zipfile.ZipFile(plain) as archive:
        xml = archive.read(member).decode()
    declaration_end = xml.index("?>") + 2 if xml.startswith("<?xml") else 0
    hostile = xml[:declaration_end] + f"<!DOCTYPE worksheet [{entities}]>" + xml[declaration_end:].replace(
        "laugh", "&lol9;")
    with_member_replaced(plain, Path(path), member, hostile.encode())
    plain.unlink()
    return Path(path)
