"""The extraction child process: `python -m glmstack.knowledge.extraction.child`.

Reads {"path", "filename", "limits"} as JSON on stdin, caps its own address space, CPU time and core dumps,
extracts, and writes one JSON object to stdout: {"ok": Extracted fields} or {"error": {"reason", "message"}}.
The parent (sandbox.py) adds the wall-clock limit and owns the process's scratch directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from glmstack.knowledge.extraction.results import (
    Extracted,
    ExtractionError,
    ExtractionLimits,
    is_out_of_memory,
)
from glmstack.knowledge.extraction.sniff import sniff
from glmstack.knowledge.extraction.zip_guard import check_office_zip

MEMORY_MESSAGE = "Extracting the text needed more memory than the {} MB allowed."


def extract_here(path: Path, filename: str, limits: ExtractionLimits) -> Extracted:
    """Extraction in this process, resource limits already applied."""
    kind = sniff(path, filename)
    if kind == "zip":
        kind = check_office_zip(path, limits)
    if kind == "pdf":
        from glmstack.knowledge.extraction.pdf import extract_pdf
        return extract_pdf(path, limits)
    if kind in ("docx", "xlsx", "pptx"):
        from glmstack.knowledge.extraction import office
        extractors = {"docx": office.extract_docx, "xlsx": office.extract_xlsx, "pptx": office.extract_pptx}
        return extractors[kind](path, limits)
    if kind in ("png", "jpeg"):
        from glmstack.knowledge.extraction.image_ocr import extract_image
        return extract_image(path, kind, limits)
    from glmstack.knowledge.extraction.text import extract_text
    return extract_text(path, kind, limits)


def outcome_of(path: Path, filename: str, limits: ExtractionLimits) -> dict[str, object]:
    try:
        return {"ok": asdict(extract_here(path, filename, limits))}
    except ExtractionError as error:
        return {"error": {"reason": error.reason, "message": error.message}}
    except RecursionError:
        return {"error": {"reason": "malformed", "message": "The document is nested too deeply to read."}}
    except Exception as error:  # the parsing libraries raise anything on damaged input
        # Under the address-space cap, running out shows as MemoryError, as a library the loader failed to
        # map (ImportError), or as ENOMEM; none of them means the file is bad.
        if is_out_of_memory(error):
            return {"error": {"reason": "memory", "message": MEMORY_MESSAGE.format(limits.memory_mb)}}
        detail = str(error)[:300] or type(error).__name__
        return {"error": {"reason": "malformed", "message": f"The file could not be read: {detail}."}}


def limit_resources(limits: ExtractionLimits) -> None:
    _set_limit(resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024)
    # The parent kills at timeout_s of wall-clock time; the CPU cap also stops a child spinning after that.
    _set_limit(resource.RLIMIT_CPU, math.ceil(limits.timeout_s) + 1)
    # A child killed for its CPU time (SIGXCPU) must leave no core file behind.
    _set_limit(resource.RLIMIT_CORE, 0)


def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, hard if which == resource.RLIMIT_CPU else value))


def main() -> int:
    # The answer gets its own copy of stdout; whatever a library prints goes to stderr instead.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # openpyxl and pytesseract import numpy and pandas when present, which adds ~100 MB of address space and
    # start-up time and none of what is used here.
    sys.modules["numpy"] = None  # type: ignore[assignment]
    sys.modules["pandas"] = None  # type: ignore[assignment]
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # pypdf logs a warning per oddity in a damaged file

    request = json.loads(sys.stdin.buffer.read())
    limits = ExtractionLimits(**request["limits"])
    limit_resources(limits)
    outcome = outcome_of(Path(request["path"]), request["filename"], limits)
    try:
        payload = json.dumps(outcome, ensure_ascii=False).encode()
    except MemoryError:
        outcome = {"error": {"reason": "memory", "message": MEMORY_MESSAGE.format(limits.memory_mb)}}
        payload = json.dumps(outcome).encode()
    answer.write(payload)
    answer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
