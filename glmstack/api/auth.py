"""Who is calling: the platform's two credential schemes (spec §1.2, sdk-wire §1), checked before anything
else about a request is read.

    Authorization: [Bearer ]<id>.<secret>    the API key itself (SDK default mode, OpenAI SDK, curl)
    Authorization: [Bearer ]<JWT>            HS256 JWT signed with <secret> (SDK disable_token_cache=False)

The JWT is verified here with hmac/hashlib rather than a JWT library: the platform's `exp` and `timestamp`
are in *milliseconds*, which stock libraries read as seconds (a token would never expire), and the accepted
header is narrow enough to spell out.

Deny by default: every route is a `KeyedRoute`, which authenticates before the body is read; only the paths
in PUBLIC_PATHS skip it. /docs (with its Swagger UI files, docs_page.py) and /openapi.json are plain routes and
open (they describe the API and hold no data); /metrics is keyed like the API (it reveals traffic and token volumes).

Open mode: a server bound to a loopback address while no key is active (store.keys.count_active() == 0)
serves its single local user without credentials. Whether the bind address is loopback is decided once,
from the configured host — never from a request's Host header or URL. `glmstack serve` refuses to start
open on any other address.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from glmstack.api.errors import PlatformError
from glmstack.store import Store

PUBLIC_PATHS = frozenset({"/health"})

# The SDKs send tokens valid for 210 s; the doc lets callers pick any lifetime. A day bounds how long a
# leaked token stays useful while leaving room for hand-written clients that mint long-lived tokens.
MAX_TOKEN_LIFETIME_MS = 24 * 3600 * 1000
# How far a token's `timestamp` may run ahead of our clock.
CLOCK_SKEW_MS = 5 * 60 * 1000
MAX_CREDENTIAL_CHARS = 4096
_JWT_HEADER_KEYS = frozenset({"alg", "sign_type", "typ"})


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: open mode, no key
    concurrency_limit: int | None  # the key's own limit; None: the server default
    scheme: str  # "key" | "jwt" | "open"


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credential_from(header: str | None) -> str:
    if header is None or not header.strip():
        raise PlatformError(1001)
    value = header.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    if not value or len(value) > MAX_CREDENTIAL_CHARS or any(c.isspace() for c in value):
        raise PlatformError(1002, "expected 'Bearer <id>.<secret>' or 'Bearer <JWT>'")
    return value


def _b64url(part: str) -> bytes:
    try:
        return base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise PlatformError(1002, "JWT parts must be base64url") from None


def _json_object(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(part))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PlatformError(1002, f"JWT {what} is not JSON") from None
    if not isinstance(value, dict):
        raise PlatformError(1002, f"JWT {what} must be a JSON object")
    return value


def _millis(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlatformError(1002, f"JWT {name} must be an integer number of milliseconds")
    return value


def verify_jwt(token: str, signing_secret: Callable[[str], str | None], now_ms: int) -> tuple[str, str]:
    """The key id a valid token speaks for, and its secret. `signing_secret(key_id)` is the active key's
    secret or None."""
    header_part, payload_part, signature_part = token.split(".")
    header = _json_object(header_part, "header")
    if header.get("alg") != "HS256":
        raise PlatformError(1002, "JWT alg must be HS256")
    if header.get("sign_type") != "SIGN":
        raise PlatformError(1002, "JWT header must carry sign_type SIGN")
    if header.get("typ", "JWT") != "JWT" or not header.keys() <= _JWT_HEADER_KEYS:
        raise PlatformError(1002, "unsupported JWT header")
    payload = _json_object(payload_part, "payload")
    key_id = payload.get("api_key")
    if not isinstance(key_id, str) or not key_id:
        raise PlatformError(1002, "JWT payload must name its api_key")
    exp, issued = _millis(payload, "exp"), _millis(payload, "timestamp")
    if exp is None:
        raise PlatformError(1002, "JWT payload must carry exp (milliseconds)")
    signature = _b64url(signature_part)

    secret = signing_secret(key_id)
    # An unknown key is answered like a bad signature, so the two cannot be told apart.
    expected = hmac.new(
        (secret or "").encode("utf-8"), f"{header_part}.{payload_part}".encode("ascii"), hashlib.sha256
    ).digest()
    if not hmac.compare_digest(expected, signature) or secret is None:
        raise PlatformError(1004, "JWT signature does not verify for this api_key")
    if exp <= now_ms:
        raise PlatformError(1003, "JWT exp (milliseconds since the epoch) has passed")
    if exp - now_ms > MAX_TOKEN_LIFETIME_MS:
        raise PlatformError(1002, f"JWT lifetime exceeds {MAX_TOKEN_LIFETIME_MS // 3_600_000} h")
    if issued is not None and issued - now_ms > CLOCK_SKEW_MS:
        raise PlatformError(1002, "JWT timestamp is in the future")
    return key_id, secret


class Authenticator:
    def __init__(self, store: Store, *, open_when_keyless: bool) -> None:
        self.store = store
        self.open_when_keyless = open_when_keyless
        # A key lookup in a local SQLite file (WAL: readers never wait for writers) takes ~0.2 ms, less
        # than handing it to a worker thread and back; a network database gets the worker thread.
        self.runs_inline = store.dialect == "sqlite"

    def authenticate(self, authorization: str | None) -> Caller:
        """Blocking (a database read unless the key was verified within the last second): called inline on
        SQLite, from a worker thread otherwise (see `runs_inline`)."""
        try:
            return self._verify(authorization)
        except PlatformError:
            # Checked after a failure rather than first, so keyed requests cost no extra query.
            if self.open_when_keyless and self.store.keys.count_active() == 0:
                return Caller(key_id=None, concurrency_limit=None, scheme="open")
            raise

    def _verify(self, authorization: str | None) -> Caller:
        credential = credential_from(authorization)
        dots = credential.count(".")
        if dots == 1:
            key_id, secret = credential.split(".")
            record = self.store.keys.verify_secret(key_id, secret)
            if record is None:
                raise PlatformError(1000, "unknown or revoked API key")
            return Caller(record.id, record.concurrency_limit, "key")
        if dots == 2:
            key_id, secret = verify_jwt(
                credential, self.store.keys.signing_secret, time.time_ns() // 1_000_000
            )
            # The signature proved the caller holds this key's secret; verify_secret turns it into the
            # record (and re-checks revocation).
            record = self.store.keys.verify_secret(key_id, secret)
            if record is None:
                raise PlatformError(1004, "unknown or revoked API key")
            return Caller(record.id, record.concurrency_limit, "jwt")
        raise PlatformError(1002, "expected '<id>.<secret>' or a JWT")


async def authenticate(request: Request) -> Caller:
    authenticator: Authenticator = request.app.state.platform.authenticator
    authorization = request.headers.get("authorization")
    if authenticator.runs_inline:
        caller = authenticator.authenticate(authorization)
    else:
        caller = await run_in_threadpool(authenticator.authenticate, authorization)
    request.state.caller = caller
    return caller


async def current_caller(request: Request) -> Caller:
    """Dependency: the caller `KeyedRoute` authenticated. `async` so FastAPI calls it in place instead of
    in a worker thread."""
    return request.state.caller


CallerDep = Annotated[Caller, Depends(current_caller)]


class KeyedRoute(APIRoute):
    """Authenticates before FastAPI reads the body or solves dependencies, so an anonymous client cannot
    make the server parse anything. Every router in glmstack.api uses this class."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.path in PUBLIC_PATHS:
            return handler

        async def authenticated(request: Request) -> Response:
            await authenticate(request)
            return await handler(request)

        return authenticated


def keyed_router(**kwargs: Any) -> APIRouter:
    """The router every glmstack.api resource uses. `strict_content_type=False`: a JSON body without a
    Content-Type header is still read as JSON (hand-written clients forget it)."""
    return APIRouter(route_class=KeyedRoute, strict_content_type=False, **kwargs)
