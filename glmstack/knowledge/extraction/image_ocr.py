"""Text in PNG and JPEG images by OCR: Tesseract through pytesseract, Chinese and English where the chi_sim
model is installed (Debian: tesseract-ocr, tesseract-ocr-chi-sim)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from glmstack.knowledge.extraction.results import (
    MIME_TYPES,
    Extracted,
    ExtractionError,
    ExtractionLimits,
    TextCollector,
    is_out_of_memory,
)

INSTALL_HINT = "install the tesseract-ocr and tesseract-ocr-chi-sim packages on the server"
# Tesseract's Chinese model separates every character by a space; Chinese text has none.
SPACE_BETWEEN_HAN = re.compile(r"(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])[ \t]+"
                               r"(?=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])")


def extract_image(path: Path, kind: str, limits: ExtractionLimits) -> Extracted:
    tesseract = shutil.which("tesseract")
    if tesseract is None:
        raise ExtractionError("ocr_unavailable", f"Reading text from images needs OCR: {INSTALL_HINT}.")
    import pytesseract  # type: ignore[import-untyped]

    image = _open_image(path, limits)
    languages = _installed_languages(tesseract)
    if "eng" not in languages:
        raise ExtractionError("ocr_unavailable", f"The Tesseract English model is missing: {INSTALL_HINT}.")
    try:
        text = pytesseract.image_to_string(image, lang="chi_sim+eng" if "chi_sim" in languages else "eng")
    except pytesseract.TesseractNotFoundError as error:
        if is_out_of_memory(error):
            raise MemoryError("Tesseract could not be started under the memory limit") from error
        raise ExtractionError("ocr_unavailable", f"Tesseract could not be run: {INSTALL_HINT}.") from error
    except pytesseract.TesseractError as error:
        if is_out_of_memory(error):
            raise MemoryError("Tesseract ran out of memory") from error
        raise ExtractionError("malformed", f"OCR failed on the image: {error.message}.") from error
    collector = TextCollector(limits.max_chars)
    for line in text.strip().splitlines():
        if not collector.add(SPACE_BETWEEN_HAN.sub("", line).rstrip()):
            break
    return Extracted(collector.text(), MIME_TYPES[kind], "", collector.truncated)


def _installed_languages(tesseract: str) -> set[str]:
    # pytesseract.get_languages reports any failure as "not installed"; under the memory cap Tesseract aborts
    # (std::bad_alloc), which must read as running out of memory instead.
    try:
        listing = subprocess.run([tesseract, "--list-langs"], capture_output=True, check=False)
    except OSError as error:
        if is_out_of_memory(error):
            raise
        raise ExtractionError("ocr_unavailable", f"Tesseract could not be run ({error}): {INSTALL_HINT}.") from error
    output = (listing.stdout + listing.stderr).decode(errors="replace")
    if listing.returncode != 0:
        if listing.returncode == -signal.SIGABRT or is_out_of_memory(Exception(output)):
            raise MemoryError("tesseract --list-langs ran out of memory")
        raise ExtractionError(
            "ocr_unavailable", f"tesseract --list-langs failed with status {listing.returncode}: {INSTALL_HINT}.")
    return {line.strip() for line in output.splitlines()[1:] if line.strip()}


def _open_image(path: Path, limits: ExtractionLimits) -> Any:
    """The decoded image, upright and on a white background (transparent pixels would read as black)."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise ExtractionError(
                    "too_large", f"The image is {width}x{height} pixels, more than the {limits.max_image_pixels} "
                    "allowed.")
            upright = ImageOps.exif_transpose(image)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                rgba = upright.convert("RGBA")
                flattened = Image.new("RGBA", rgba.size, "white")
                flattened.alpha_composite(rgba)
                return flattened.convert("RGB")
            return upright.convert("RGB") if upright.mode not in ("RGB", "L") else upright.copy()
    except Image.DecompressionBombError as error:
        raise ExtractionError("too_large", f"The image is too large: {error}.") from error
    except (OSError, SyntaxError, ValueError) as error:
        if is_out_of_memory(error):
            raise
        raise ExtractionError("malformed", f"The file is not a readable image: {error}.") from error
