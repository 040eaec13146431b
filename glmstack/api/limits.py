"""Request limits: concurrent generations per key and in total (spec §1.9: the platform limits request
concurrency, answering 429), the request body size, and the size of the request head and the shape of its
Host header.

The limiter's counters are touched only from the event loop thread, so they need no lock.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmstack.api.auth import Caller
from glmstack.api.errors import PlatformError, error_response

# Request line plus headers. An Authorization header is at most 4096 characters (auth.MAX_CREDENTIAL_CHARS);
# a whole head rarely passes 2 KB.
MAX_HEAD_BYTES = 16 * 1024
# host[:port] (RFC 9110 §7.2, RFC 3986 §3.2.2): a registered name or IPv4 address, or an IPv6 literal.
_HOST = re.compile(rb"(?:[A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class Lease:
    """One admitted generation. `release()` is idempotent: both the stream and the response that carries
    it may call it, whichever finishes first."""

    def __init__(self, limiter: ConcurrencyLimiter, key: str) -> None:
        self._limiter, self._key, self._held = limiter, key, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._release(self._key)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class ConcurrencyLimiter:
    def __init__(self, *, per_key: int | None, total: int) -> None:
        # The default for keys without their own concurrency_limit (and the open mode's caller); None: only
        # `total` bounds them.
        self.per_key = per_key
        self.total = total  # generations admitted at once, across all keys
        self._active: Counter[str] = Counter()
        self._total_active = 0

    @property
    def active(self) -> int:
        return self._total_active

    def acquire(self, caller: Caller) -> Lease:
        key = caller.key_id or ""
        limit = caller.concurrency_limit or self.per_key
        if limit is not None and self._active[key] >= limit:
            raise PlatformError(1302, f"this key already has {limit} request(s) in flight")
        if self._total_active >= self.total:
            raise PlatformError(1305, f"the server is busy ({self.total} requests in flight)")
        self._active[key] += 1
        self._total_active += 1
        return Lease(self, key)

    def _release(self, key: str) -> None:
        self._active[key] -= 1
        if self._active[key] <= 0:
            del self._active[key]
        self._total_active -= 1


class BodySizeLimit:
    """ASGI middleware: refuses bodies over `max_bytes` — up front from Content-Length, and while the body
    streams in (chunked uploads declare no length), so an oversized body is never held in memory.

    Paths in `exempt` (file uploads) are left alone: their handlers stream the body to disk under caps of
    their own (api/uploads.py)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException, because FastAPI re-raises those from a body read (anything else
                    # becomes a generic 400); errors.install maps 413 to the envelope.
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes"

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            PlatformError(1210, self._detail(), http_status=413).body(),
            ensure_ascii=False,
            separators=(",", ":"),
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode("utf-8")})


class RequestHeadCheck:
    """ASGI middleware, before anything reads the request: a head over MAX_HEAD_BYTES gets 400 (h11 only
    limits a head that arrives in pieces: one sent in a single packet reaches us whole), and so does a Host
    header that is not `host[:port]` (RFC 9112 §3.2); a path with a NUL character (%00) gets 404. Nothing in
    glmstack decides anything from Host, but Starlette builds `request.url` from it, and a Host carrying "/" or
    "?" would make that URL name another path than the one requested."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope: Scope) -> PlatformError | None:
        headers = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope["query_string"])
        size += sum(len(name) + len(value) + 4 for name, value in headers)
        if size > MAX_HEAD_BYTES:
            return PlatformError(1210, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
        if "\x00" in scope["path"]:
            # no id holds one (PostgreSQL text cannot even be compared with it: the query would fail), so no
            # route's resource can be named by such a path
            return PlatformError(1214, "the request path contains a NUL character", http_status=404, field="path")
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) > 1 or (hosts and hosts[0] and not _HOST.fullmatch(hosts[0])):
            return PlatformError(1214, "expected one Host header of the form host[:port]", field="Host")
        return None
