"""Text extraction (glmstack.knowledge.extraction) on real files written by the libraries that make them in the
wild, and on hostile ones: each format's text, the type read from the content, and refusals with their
reasons - from a child process whose time, memory and text are bounded and which leaves nothing on disk."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import psutil
import pytest
from make_files import (
    cjk_font,
    make_billion_laughs_xlsx,
    make_csv,
    make_docx,
    make_encrypted_pdf,
    make_many_entries_zip,
    make_ole,
    make_pdf,
    make_png,
    make_pptx,
    make_text,
    make_xlsx,
    make_xxe_docx,
    make_zip_bomb,
    with_member_added,
)

from glmstack.knowledge.extraction import (
    SUPPORTED_EXTENSIONS,
    Extracted,
    ExtractionError,
    ExtractionLimits,
    extract,
)

DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
PPTX = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
# Chinese in a PDF or an image needs a font with its glyphs on this machine (Debian: fonts-wqy-microhei).
CHINESE_DRAWABLE = cjk_font() is not None
TESSERACT = shutil.which("tesseract")


def tesseract_languages() -> set[str]:
    if TESSERACT is None:
        return set()
    listing = subprocess.run([TESSERACT, "--list-langs"], capture_output=True, text=True, check=True)
    return {line.strip() for line in listing.stdout.splitlines()[1:]}


def refusal(path: Path, filename: str | None = None, limits: ExtractionLimits | None = None) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        extract(path, filename or path.name, limits or ExtractionLimits())
    return caught.value


# --- each format ---------------------------------------------------------------------------------------------


def test_pdf_pages_are_joined_in_order_with_the_metadata_title(tmp_path: Path) -> None:
    pages = ["The first page talks about retrieval.", "The second page talks about embeddings."]
    if CHINESE_DRAWABLE:
        pages.append("第三页：知识库与向量检索。")
    pdf = make_pdf(tmp_path / "report.pdf", pages, title="Quarterly Report", page_per_paragraph=True)

    extracted = extract(pdf, "report.pdf")

    assert extracted.file_type == "application/pdf"
    assert extracted.title == "Quarterly Report"
    assert not extracted.truncated
    positions = [extracted.text.index(page) for page in pages]
    assert positions == sorted(positions)
    assert extracted.text.count("\n") >= len(pages) - 1


def test_docx_paragraphs_and_tables_keep_document_order(tmp_path: Path) -> None:
    docx = make_docx(tmp_path / "notes.docx", ["Project plan 项目计划", "第二段：English and 中文."],
                     table=[["名称", "Value"], ["苹果", "3"]], title="计划书")

    extracted = extract(docx, "notes.docx")

    assert extracted == Extracted(
        text="Project plan 项目计划\n第二段：English and 中文.\n名称\tValue\n苹果\t3\nEnd of document.",
        file_type=DOCX, title="计划书", truncated=False)


def test_xlsx_sheets_become_a_name_line_and_tab_separated_rows(tmp_path: Path) -> None:
    xlsx = make_xlsx(tmp_path / "sales.xlsx", {
        "销售": [["产品", "数量"], ["苹果", 3], ["Pear", 2.5]],
        "Notes": [["a", None, "c"], [None, None], ["multi\nline", "tab\there"]],
    })

    extracted = extract(xlsx, "sales.xlsx")

    assert extracted.text == "销售\n产品\t数量\n苹果\t3\nPear\t2.5\n\nNotes\na\t\tc\nmulti line\ttab here"
    assert extracted.file_type == XLSX
    assert not extracted.truncated


def test_pptx_slides_with_their_notes_and_tables(tmp_path: Path) -> None:
    pptx = make_pptx(tmp_path / "deck.pptx", [("Roadmap 路线图", "Ship retrieval 发布检索"), ("Second", "More")],
                     notes=["Speaker notes 备注"], table=[["Quarter", "目标"], ["Q1", "上线"]], title="Deck 演示")

    extracted = extract(pptx, "deck.pptx")

    assert extracted.text == ("Roadmap 路线图\nShip retrieval 发布检索\nSpeaker notes 备注\n\nSecond\nMore\n\n"
                              "Quarter\t目标\nQ1\t上线")
    assert (extracted.file_type, extracted.title) == (PPTX, "Deck 演示")


def test_csv_is_returned_as_decoded_text(tmp_path: Path) -> None:
    csv_file = make_csv(tmp_path / "table.csv", [["城市", "population"], ["北京", "21540000"], ["a,b", "x"]])

    extracted = extract(csv_file, "table.csv")

    assert extracted.text == '城市,population\n北京,21540000\n"a,b",x\n'
    assert extracted.file_type == "text/csv"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gb18030", "utf-16"])
def test_text_and_markdown_in_the_encodings_editors_save(tmp_path: Path, encoding: str) -> None:
    text = "# 知识库 Knowledge\r\n中文段落，English words.\r\n"
    for name, mime in (("readme.md", "text/markdown"), ("notes.txt", "text/plain")):
        extracted = extract(make_text(tmp_path / name, text, encoding), name)
        assert extracted == Extracted("# 知识库 Knowledge\n中文段落，English words.\n", mime, "", False)


@pytest.mark.skipif(TESSERACT is None, reason="the tesseract binary is not installed (Debian: tesseract-ocr)")
@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_ocr_reads_the_text_of_an_image(tmp_path: Path, image_format: str) -> None:
    lines = ["Hello OCR World 2024"]
    if CHINESE_DRAWABLE and "chi_sim" in tesseract_languages():
        lines.append("你好，世界。知识库")
    image = make_png(tmp_path / "screenshot.png", lines)
    if image_format == "jpeg":
        from PIL import Image

        with Image.open(image) as png:
            png.save(tmp_path / "screenshot.jpg", quality=95)
        image = tmp_path / "screenshot.jpg"

    extracted = extract(image, image.name)

    assert extracted.file_type == f"image/{image_format}"
    for line in lines:
        assert line in extracted.text


def test_ocr_without_tesseract_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = make_png(tmp_path / "scan.png", ["No OCR here"])
    monkeypatch.setenv("PATH", str(tmp_path))  # the child finds no tesseract binary

    error = refusal(image)

    assert error.reason == "ocr_unavailable"
    assert "tesseract-ocr" in error.message and "tesseract-ocr-chi-sim" in error.message


def test_an_image_over_the_pixel_limit_is_too_large(tmp_path: Path) -> None:
    image = make_png(tmp_path / "poster.png", ["Big"])

    error = refusal(image, limits=ExtractionLimits(max_image_pixels=1000))

    assert error.reason == "too_large"


def test_the_supported_extensions() -> None:
    assert set(SUPPORTED_EXTENSIONS) == {".pdf", ".docx", ".xlsx", ".pptx", ".csv", ".txt", ".md", ".png", ".jpg",
                                         ".jpeg"}


# --- the type comes from the bytes ---------------------------------------------------------------------------


def test_the_content_decides_the_type_not_the_name(tmp_path: Path) -> None:
    docx = make_docx(tmp_path / "a.docx", ["Really a Word document."])
    pdf = make_pdf(tmp_path / "b.pdf", ["Really a PDF."])

    assert extract(docx, "report.pdf").file_type == DOCX
    assert extract(pdf, "notes.txt").file_type == "application/pdf"
    assert "Really a PDF." in extract(pdf, "noextension").text


def test_only_the_last_suffix_of_a_path_like_client_name_counts(tmp_path: Path) -> None:
    notes = make_text(tmp_path / "stored-under-an-id", "The signature %PDF-1.7 is mentioned here.")

    assert extract(notes, "..\\..\\Windows\\notes.TXT").file_type == "text/plain"
    assert extract(notes, "../../etc/readme.md").text == "The signature %PDF-1.7 is mentioned here."
    assert refusal(make_text(tmp_path / "plain", "plain words"), "/etc/passwd").reason == "unsupported"


def test_random_bytes_named_pdf_are_malformed(tmp_path: Path) -> None:
    fake = tmp_path / "fake.pdf"
    fake.write_bytes(bytes(range(256)) * 20)

    error = refusal(fake)

    assert error.reason == "malformed"
    assert ".pdf" in error.message


def test_unknown_binary_and_empty_files(tmp_path: Path) -> None:
    program = tmp_path / "tool.exe"
    program.write_bytes(b"MZ\x90\x00" + bytes(500))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary_text = tmp_path / "data.txt"
    binary_text.write_bytes(b"abc\x00\x01\x02")

    assert refusal(program).reason == "unsupported"
    assert refusal(empty).reason == "empty"
    assert refusal(binary_text).reason == "malformed"


def test_legacy_office_files_are_refused_with_the_format_to_save_as(tmp_path: Path) -> None:
    error = refusal(make_ole(tmp_path / "old.doc"))

    assert error.reason == "unsupported"
    assert ".docx" in error.message and ".xlsx" in error.message and ".pptx" in error.message


def test_a_password_protected_office_document_is_encrypted(tmp_path: Path) -> None:
    assert refusal(make_ole(tmp_path / "locked.docx", encrypted_package=True)).reason == "encrypted"


# --- PDF damage and encryption -------------------------------------------------------------------------------


def test_a_pdf_with_a_user_password_is_encrypted(tmp_path: Path) -> None:
    pdf = make_encrypted_pdf(tmp_path / "locked.pdf", ["Top secret"], password="s3cret")

    error = refusal(pdf)

    assert error.reason == "encrypted"
    assert "password" in error.message


def test_a_pdf_encrypted_without_a_user_password_is_read(tmp_path: Path) -> None:
    # Only the owner password is set (printing/copying restrictions): readers open it with the empty password.
    pdf = make_encrypted_pdf(tmp_path / "restricted.pdf", ["Readable but restricted"], password="")

    assert "Readable but restricted" in extract(pdf, "restricted.pdf").text


def test_a_truncated_pdf_is_malformed(tmp_path: Path) -> None:
    whole = make_pdf(tmp_path / "whole.pdf", ["Some text"] * 20)
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(whole.read_bytes()[:400])

    error = refusal(truncated)

    assert error.reason == "malformed"


# --- hostile packages ----------------------------------------------------------------------------------------


def test_a_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    bomb = make_zip_bomb(tmp_path / "bomb.docx", inflated_bytes=1 << 30)
    assert bomb.stat().st_size < 2 << 20
    with zipfile.ZipFile(bomb) as archive, archive.open("word/document.xml") as member:
        assert member.read(1 << 20) == bytes(1 << 20)  # a real deflate stream of zeros

    assert refusal(bomb).reason == "zip_bomb"
    # Under a per-member limit it would pass, the ratio still gives it away.
    generous = ExtractionLimits(max_member_bytes=2 << 30, max_total_bytes=2 << 30)
    assert "compressed" in refusal(bomb, limits=generous).message


def test_a_package_with_too_many_entries_is_refused(tmp_path: Path) -> None:
    package = make_many_entries_zip(tmp_path / "many.docx", entries=10_001)

    error = refusal(package)

    assert error.reason == "zip_bomb"
    assert "10001 entries" in error.message


def test_an_external_entity_is_never_resolved(tmp_path: Path) -> None:
    docx = make_xxe_docx(tmp_path / "xxe.docx", target="/etc/passwd")

    error = refusal(docx)

    assert error.reason == "malformed"
    assert "DTD/entity declaration" in error.message
    assert "root:" not in error.message


def test_entity_expansion_in_a_workbook_is_refused(tmp_path: Path) -> None:
    assert refusal(make_billion_laughs_xlsx(tmp_path / "laughs.xlsx")).reason == "malformed"


def test_a_package_member_with_a_parent_path_is_malformed(tmp_path: Path) -> None:
    docx = make_docx(tmp_path / "plain.docx", ["Hello"])
    hostile = with_member_added(docx, tmp_path / "slip.docx", "../../etc/evil.xml", b"<x/>")

    error = refusal(hostile)

    assert error.reason == "malformed"
    assert "unsafe path" in error.message


def test_a_plain_zip_is_not_an_office_document(tmp_path: Path) -> None:
    archive_path = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("a.txt", "hello")

    assert refusal(archive_path, "photos.docx").reason == "unsupported"


# --- bounds --------------------------------------------------------------------------------------------------


def test_text_beyond_max_chars_is_cut_and_marked(tmp_path: Path) -> None:
    text_file = make_text(tmp_path / "huge.txt", "汉字abc\n" * 100_000)
    docx = make_docx(tmp_path / "long.docx", [f"Paragraph {number}" for number in range(500)])

    cut = extract(text_file, "huge.txt", ExtractionLimits(max_chars=1000))
    cut_docx = extract(docx, "long.docx", ExtractionLimits(max_chars=100))

    assert (len(cut.text), cut.truncated) == (1000, True)
    assert cut.text == ("汉字abc\n" * 200)[:1000]
    assert (len(cut_docx.text), cut_docx.truncated) == (100, True)
    assert cut_docx.text.startswith("Paragraph 0\nParagraph 1\n")


def test_pages_beyond_max_pages_are_not_read(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "three.pdf", ["Page one.", "Page two.", "Page three."], page_per_paragraph=True)

    extracted = extract(pdf, "three.pdf", ExtractionLimits(max_pages=2))

    assert extracted.truncated
    assert "Page two." in extracted.text and "Page three." not in extracted.text


def test_running_over_the_time_limit_kills_the_extraction(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "long.pdf", ["A page of text. " * 80] * 50, page_per_paragraph=True)

    error = refusal(pdf, limits=ExtractionLimits(timeout_s=0.05))

    assert error.reason == "timeout"
    assert psutil.Process().children(recursive=True) == []


def test_a_tiny_memory_limit_fails_cleanly(tmp_path: Path) -> None:
    docx = make_docx(tmp_path / "normal.docx", ["Just a normal document."])

    error = refusal(docx, limits=ExtractionLimits(memory_mb=16))

    assert error.reason == "memory"
    assert "16 MB" in error.message


def test_nothing_is_left_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pdf = make_pdf(inputs / "doc.pdf", ["Text for the record."])
    image = make_png(inputs / "scan.png", ["Scratch files"])
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again

    extract(pdf, "doc.pdf")
    refusal(pdf, limits=ExtractionLimits(timeout_s=0.05))
    if TESSERACT is not None:
        extract(image, "scan.png")  # pytesseract writes its image and output files to the temp directory

    assert list(scratch.iterdir()) == []
    assert sorted(path.name for path in inputs.iterdir()) == ["doc.pdf", "scan.png"]
