"""Uploaded bytes on disk: GLMSTACK_HOME/files/<32 hex>, named by the server, never by a client.

An upload is written to a fresh file under `staging/`, checked, then moved into place with one rename
(`adopt`), so a blob is either whole or absent. The database row that names a blob is written after the
rename; a crash in between leaves a blob nobody names, which `sweep` removes at the next start, together
with staging files of uploads that never finished.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
import unicodedata
from pathlib import Path

log = logging.getLogger(__name__)

BLOB_NAME = re.compile(r"[0-9a-f]{32}")
STAGING = "staging"
# sweep() leaves files younger than this alone: another server process sharing this home may be writing
# them (a staging file), or may have renamed one into place and not yet inserted the row that names it.
ORPHAN_GRACE_S = 3600.0
MAX_DISPLAY_NAME = 255
DEFAULT_DISPLAY_NAME = "file"
# Bidirectional overrides and isolates: they make "exe.txt" display as "txt.exe".
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_name(raw: str) -> str:
    """A client's filename as something safe to show and store (never to open): the last path segment
    (either separator: Windows clients send backslashes), no control or bidi-override characters, at most
    MAX_DISPLAY_NAME characters with the extension kept. Unicode letters stay as they are."""
    name = re.split(r"[/\\]", raw)[-1]
    name = "".join(
        ch for ch in name if unicodedata.category(ch) != "Cc" and ch not in _BIDI_CONTROLS
    ).strip()
    if name in ("", ".", ".."):
        return DEFAULT_DISPLAY_NAME
    if len(name) > MAX_DISPLAY_NAME:
        stem, dot, suffix = name.rpartition(".")
        if dot and stem and len(suffix) < 16:
            name = stem[: MAX_DISPLAY_NAME - len(suffix) - 1] + "." + suffix
        else:
            name = name[:MAX_DISPLAY_NAME]
    return name


class BlobStore:
    """Files under `root`, each named by a random 32-hex-digit id. Thread-safe (each call is one filesystem
    operation on a name nobody else uses)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / STAGING
        self.staging.mkdir(parents=True, exist_ok=True)

    def staging_path(self) -> Path:
        """A fresh path under staging/ to write an upload to (not created: the writer opens it)."""
        return self.staging / secrets.token_hex(16)

    def adopt(self, staged: Path) -> str:
        """Moves a staged file into the store (one rename on the same filesystem) and returns its blob name."""
        if Path(staged).parent != self.staging:
            raise ValueError(f"{staged} is not a staging file of this store")
        name = secrets.token_hex(16)
        os.replace(staged, self.root / name)
        return name

    def path(self, blob: str) -> Path:
        """The file of a blob. Refuses anything that is not a blob name, so a value from the database can
        never point outside the store."""
        if not BLOB_NAME.fullmatch(blob):
            raise ValueError(f"not a blob name: {blob!r}")
        return self.root / blob

    def delete(self, blob: str) -> None:
        self.path(blob).unlink(missing_ok=True)

    def sweep(self, keep: set[str], *, grace_s: float = ORPHAN_GRACE_S) -> int:
        """Removes staging leftovers and blobs not in `keep` that were last written more than `grace_s`
        seconds ago; files with other names are left alone. Returns how many were removed."""
        cutoff = time.time() - grace_s
        removed = 0
        candidates = [p for p in self.staging.iterdir() if p.is_file()]
        candidates += [p for p in self.root.iterdir()
                       if p.is_file() and BLOB_NAME.fullmatch(p.name) and p.name not in keep]
        for path in candidates:
            try:
                if path.stat().st_mtime <= cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # removed meanwhile (a finished upload moved it, another sweep)
                continue
        if removed:
            log.info("removed %d orphaned file(s) from %s", removed, self.root)
        return removed
