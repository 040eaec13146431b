"""extract(): runs the child process (child.py) on one file and turns its answer into Extracted or
ExtractionError. This side never parses the file; it bounds the child's wall-clock time, kills the child's
whole process group when it runs over (Tesseract runs as a grandchild), and gives it a scratch directory for
temporary files that is removed whatever happens."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import glmstack
from glmstack.knowledge.extraction.results import REASONS, Extracted, ExtractionError, ExtractionLimits

CHILD_MODULE = "glmstack.knowledge.extraction.child"
# Signals that end a child which ran out of memory: the kernel's OOM killer, or a C library that aborted or
# crashed when an allocation failed under the address-space cap.
MEMORY_SIGNALS = {signal.SIGKILL, signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS}

logger = logging.getLogger(__name__)
DEFAULT_LIMITS = ExtractionLimits()  # frozen, so one shared default is safe


def extract(path: Path, filename: str, limits: ExtractionLimits = DEFAULT_LIMITS) -> Extracted:
    """The text of the file at `path`, which the client called `filename` (whose extension only tells CSV,
    Markdown and plain text apart). Blocking; raises ExtractionError with a reason and an English message."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(path)
    request = json.dumps({"path": str(path), "filename": filename, "limits": asdict(limits)}).encode()
    with tempfile.TemporaryDirectory(prefix="glmstack-extract-") as scratch:
        child = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=scratch, env=_child_environment(scratch), start_new_session=True,
        )
        try:
            stdout, stderr = child.communicate(request, timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_process_group(child)
            raise ExtractionError(
                "timeout", f"Extracting the text took longer than the {limits.timeout_s:g} seconds allowed.") from None
        except BaseException:
            _kill_process_group(child)
            raise
    return _answer(child.returncode, stdout, stderr, limits)


def _child_environment(scratch: str) -> dict[str, str]:
    environment = dict(os.environ)
    # Temporary files (pytesseract's) go to the scratch directory, removed even when the child is killed.
    environment.update(TMPDIR=scratch, TEMP=scratch, TMP=scratch)
    # Tesseract's OpenMP threads cost more than they gain on one image and would multiply its address space.
    environment["OMP_THREAD_LIMIT"] = "1"
    # The child must import this package even where the parent found it in a source tree on its own sys.path.
    # An installed package needs nothing (and site-packages on PYTHONPATH would rank above the standard
    # library, letting an old backport such as `dataclasses` shadow it).
    package_root = Path(glmstack.__file__).resolve().parent.parent
    if package_root.name not in ("site-packages", "dist-packages"):
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), environment.get("PYTHONPATH")]))
    return environment


def _kill_process_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.communicate()


def _answer(returncode: int, stdout: bytes, stderr: bytes, limits: ExtractionLimits) -> Extracted:
    try:
        outcome = json.loads(stdout)
    except ValueError:
        outcome = None
    if isinstance(outcome, dict) and isinstance(outcome.get("ok"), dict):
        fields = outcome["ok"]
        text = str(fields["text"])
        return Extracted(
            text=text[:limits.max_chars],
            file_type=str(fields["file_type"]),
            title=str(fields["title"]),
            truncated=bool(fields["truncated"]) or len(text) > limits.max_chars,
        )
    if isinstance(outcome, dict) and isinstance(outcome.get("error"), dict):
        reason = str(outcome["error"].get("reason"))
        raise ExtractionError(reason if reason in REASONS else "malformed", str(outcome["error"].get("message")))
    logger.warning("extraction child exited with status %s and no answer; stderr ends: %s",
                   returncode, stderr[-2000:].decode(errors="replace"))
    if returncode == -signal.SIGXCPU:
        raise ExtractionError(
            "timeout", f"Extracting the text used more than the {limits.timeout_s:g} seconds of CPU time allowed.")
    if returncode < 0 and -returncode in MEMORY_SIGNALS or returncode > 0:
        raise ExtractionError(
            "memory", f"The extraction process stopped without an answer (exit status {returncode}), most likely "
            f"for lack of memory under the {limits.memory_mb} MB allowed.")
    raise ExtractionError(
        "malformed", f"The extraction process stopped without an answer (exit status {returncode}).")
