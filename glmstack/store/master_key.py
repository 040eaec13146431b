"""The server's master key: a Fernet key in GLMSTACK_HOME/secret.key that seals API-key secrets at rest."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet

log = logging.getLogger(__name__)


def load_master_key(path: Path) -> Fernet:
    """The Fernet key stored at `path`, created (mode 0600) on first use.

    A new key is written to a private temporary file and then hard-linked into place: linking fails if the
    file already exists, so two processes starting together end up sharing whichever key landed first
    instead of one silently replacing the other's (which would make its sealed secrets unreadable)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                log.info("created master key %s", path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; it should be mode 0600", path)
    try:
        return Fernet(path.read_bytes().strip())
    except ValueError:
        raise ValueError(f"{path} does not hold a Fernet key (32 url-safe base64-encoded bytes)") from None
