"""Word, Excel and PowerPoint text, read only after zip_guard has checked the package.

Table rows become tab-separated lines (tabs and line breaks inside a cell become spaces, so one row stays one
line); documents keep their reading order: paragraphs and tables as they appear, sheets in workbook order
(a line with the sheet name, then its rows), slides in presentation order with their tables and notes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from glmstack.knowledge.extraction.results import MIME_TYPES, Extracted, ExtractionLimits, TextCollector


def table_row(cells: Iterable[str]) -> str:
    return "\t".join(" ".join(cell.split()) for cell in cells)


def extract_docx(path: Path, limits: ExtractionLimits) -> Extracted:
    from docx import Document
    from docx.table import Table

    document = Document(str(path))
    collector = TextCollector(limits.max_chars)
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            lines: Iterable[str] = (table_row(_docx_row_cells(row)) for row in block.rows)
        else:
            lines = [block.text]
        if not all(collector.add(line) for line in lines):
            break
    return Extracted(collector.text(), MIME_TYPES["docx"], _core_title(document.core_properties),
                     collector.truncated)


def _docx_row_cells(row: Any) -> Iterator[str]:
    # row.cells repeats a merged cell once per grid column it spans; its text belongs in the row once.
    previous = None
    for cell in row.cells:
        if cell._tc is previous:
            continue
        previous = cell._tc
        yield cell.text


def extract_xlsx(path: Path, limits: ExtractionLimits) -> Extracted:
    from openpyxl import load_workbook  # type: ignore[import-untyped]

    # A file object, not the path: openpyxl refuses a path whose name does not end in .xlsx, and stored uploads
    # are named by their blob id (the type was sniffed from the bytes already).
    handle = open(path, "rb")
    workbook = load_workbook(handle, read_only=True, data_only=True)
    collector = TextCollector(limits.max_chars)
    try:
        full = True
        for number, sheet in enumerate(workbook.worksheets):
            if number and not collector.add(""):
                break
            if not collector.add(sheet.title):
                break
            # The dimension a file declares can span far more cells than it holds; forgetting it makes
            # read-only rows as long as their own cells, not as wide as the claimed range.
            if hasattr(sheet, "reset_dimensions"):
                sheet.reset_dimensions()
            for values in sheet.iter_rows(values_only=True):
                cells = ["" if value is None else str(value) for value in values]
                while cells and not cells[-1].strip():
                    cells.pop()
                if cells and not collector.add(table_row(cells)):
                    full = False
                    break
            if not full:
                break
        title = workbook.properties.title or ""
    finally:
        workbook.close()
        handle.close()
    return Extracted(collector.text(), MIME_TYPES["xlsx"], str(title).strip(), collector.truncated)


def extract_pptx(path: Path, limits: ExtractionLimits) -> Extracted:
    from pptx import Presentation

    presentation = Presentation(str(path))
    collector = TextCollector(limits.max_chars)
    for number, slide in enumerate(presentation.slides):
        lines: list[str] = [""] if number else []
        lines += _shape_lines(slide.shapes)
        if slide.has_notes_slide:
            notes = slide.notes_slide.notes_text_frame
            if notes is not None and notes.text.strip():
                lines.append(notes.text.replace("\v", "\n"))
        if not all(collector.add(line) for line in lines):
            break
    return Extracted(collector.text(), MIME_TYPES["pptx"], _core_title(presentation.core_properties),
                     collector.truncated)


def _shape_lines(shapes: Iterable[Any]) -> Iterator[str]:
    from pptx.shapes.group import GroupShape

    for shape in shapes:
        if isinstance(shape, GroupShape):
            yield from _shape_lines(shape.shapes)
        elif shape.has_text_frame:
            text = shape.text_frame.text.replace("\v", "\n")  # python-pptx writes a line break as \v
            if text.strip():
                yield text
        elif getattr(shape, "has_table", False):
            for row in shape.table.rows:
                yield table_row(cell.text for cell in row.cells)


def _core_title(core_properties: Any) -> str:
    return str(core_properties.title or "").strip()
