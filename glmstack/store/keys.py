"""API keys in the platform's documented `{id}.{secret}` form.

The id is public (it travels in every JWT); the secret is shown once at creation and stored twice: as a
SHA-256 hash, which plain Bearer keys are checked against, and sealed with the master key, because the
HS256 JWT scheme needs the secret itself to verify a signature (see tables.api_keys).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Row, func, insert, select, update

from glmstack.store.db import Database
from glmstack.store.tables import api_keys

log = logging.getLogger(__name__)

# Neither half may contain the "." that separates them. Ids are letters and digits only, so one never starts
# with "-" and reads as an option on the command line (`glmstack keys revoke ID`); secrets are token_urlsafe.
ID_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 16       # ~95 random bits
SECRET_BYTES = 32    # 43 characters, 256 random bits
MAX_NAME_LENGTH = 200
# Compared against when the id is unknown, so that path costs the same hash-and-compare as a wrong secret.
_NO_SUCH_HASH = "0" * 64
_ID_CHARS = frozenset(ID_ALPHABET)
MAX_ID_LENGTH = 64
# A verified key is remembered this long, so that a busy server does not query the database (and unseal
# a JWT secret) on every request. `revoke` in this process forgets at once; a key revoked by another
# process (`glmstack keys revoke` while the server runs) stops working within this time.
VERIFIED_TTL_S = 1.0
_MAX_REMEMBERED = 4096


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    concurrency_limit: int | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def well_formed_id(key_id: str) -> bool:
    """Whether `key_id` could name a key. Checked before a lookup: ids reach us from request headers and JWT
    payloads, and PostgreSQL refuses some strings outright (a NUL) instead of finding no row."""
    return 0 < len(key_id) <= MAX_ID_LENGTH and _ID_CHARS.issuperset(key_id)


def hash_secret(secret: str) -> str:
    # Plain SHA-256, not a slow password hash: the secret is 256 random bits, so there is nothing to
    # brute-force, and this runs on every request.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _record(row: Row) -> KeyRecord:
    return KeyRecord(id=row.id, name=row.name, created_at=_utc(row.created_at),
                     revoked_at=_utc(row.revoked_at), concurrency_limit=row.concurrency_limit)


_RECORD_COLUMNS = (api_keys.c.id, api_keys.c.name, api_keys.c.created_at, api_keys.c.revoked_at,
                   api_keys.c.concurrency_limit)


class KeyStore:
    def __init__(self, db: Database, sealer: Fernet, *, clock: Callable[[], float] = time.monotonic):
        """`clock` times the remembered keys (seconds, only ever compared): tests pass a fake one."""
        self._db = db
        self._sealer = sealer
        self._clock = clock
        # (key id, hash of the secret) -> (expiry, record); key id -> (expiry, secret). Hits only.
        self._verified: dict[tuple[str, str], tuple[float, KeyRecord]] = {}
        self._secrets: dict[str, tuple[float, str]] = {}
        self._remembered_lock = threading.Lock()

    def _forget(self) -> None:
        with self._remembered_lock:
            self._verified.clear()
            self._secrets.clear()

    def _remember(self, cache: dict[Any, tuple[float, Any]], key: object, value: object) -> None:
        with self._remembered_lock:
            if len(cache) >= _MAX_REMEMBERED:
                cache.clear()
            cache[key] = (self._clock() + VERIFIED_TTL_S, value)

    def _recall(self, cache: dict[Any, tuple[float, Any]], key: object) -> object | None:
        hit = cache.get(key)
        return hit[1] if hit is not None and hit[0] > self._clock() else None

    def create(self, name: str = "", *, concurrency_limit: int | None = None) -> tuple[KeyRecord, str]:
        """A new key. Returns its record and the full `id.secret` key, which is never retrievable again."""
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"key name is longer than {MAX_NAME_LENGTH} characters")
        if concurrency_limit is not None and concurrency_limit < 1:
            raise ValueError(f"concurrency limit must be at least 1, got {concurrency_limit}")
        key_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
        secret = secrets.token_urlsafe(SECRET_BYTES)
        record = KeyRecord(id=key_id, name=name, created_at=datetime.now(UTC), revoked_at=None,
                           concurrency_limit=concurrency_limit)
        with self._db.write() as conn:
            conn.execute(insert(api_keys).values(
                id=key_id, name=name, secret_hash=hash_secret(secret),
                sealed_secret=self._sealer.encrypt(secret.encode("utf-8")).decode("ascii"),
                created_at=record.created_at, concurrency_limit=concurrency_limit,
            ))
        return record, f"{key_id}.{secret}"

    def revoke(self, key_id: str) -> bool:
        """True if an active key was revoked; False if the id is unknown or already revoked."""
        if not well_formed_id(key_id):
            return False
        with self._db.write() as conn:
            result = conn.execute(update(api_keys)
                                  .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                                  .values(revoked_at=datetime.now(UTC)))
        # After the write, so every lookup from here on reads the revocation (one that read just before it
        # may still remember the key, for at most VERIFIED_TTL_S).
        self._forget()
        return result.rowcount == 1

    def list(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(select(*_RECORD_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id))
            return [_record(row) for row in rows]

    def count_active(self) -> int:
        with self._db.read() as conn:
            return conn.execute(select(func.count()).select_from(api_keys)
                                .where(api_keys.c.revoked_at.is_(None))).scalar_one()

    def verify_secret(self, key_id: str, secret: str) -> KeyRecord | None:
        """The key's record if `secret` is its secret and it is not revoked; None otherwise."""
        presented = hash_secret(secret)
        remembered = self._recall(self._verified, (key_id, presented))
        if isinstance(remembered, KeyRecord):
            return remembered
        row = None
        if well_formed_id(key_id):
            with self._db.read() as conn:
                row = conn.execute(select(*_RECORD_COLUMNS, api_keys.c.secret_hash)
                                   .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))).first()
        expected = row.secret_hash if row is not None else _NO_SUCH_HASH
        if row is None or not hmac.compare_digest(presented.encode("ascii"), expected.encode("ascii")):
            return None
        record = _record(row)
        self._remember(self._verified, (key_id, presented), record)
        return record

    def signing_secret(self, key_id: str) -> str | None:
        """The secret of an active key, for verifying the HS256 JWTs it signs; None if unknown or revoked."""
        if not well_formed_id(key_id):
            return None
        remembered = self._recall(self._secrets, key_id)
        if isinstance(remembered, str):
            return remembered
        with self._db.read() as conn:
            sealed = conn.execute(select(api_keys.c.sealed_secret)
                                  .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))).scalar()
        if sealed is None:
            return None
        try:
            secret = self._sealer.decrypt(sealed.encode("ascii")).decode("utf-8")
        except InvalidToken:
            # The master key changed (secret.key replaced or a different GLMSTACK_HOME): plain Bearer keys
            # still work through the hash, JWTs for this key cannot be verified.
            log.warning("cannot unseal the secret of key %s: the master key does not match", key_id)
            return None
        self._remember(self._secrets, key_id, secret)
        return secret
