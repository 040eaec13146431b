"""Request limits: concurrent generations per key and in total (spec §1.9: the platform limits request
concurrency, answering 429), and the request body size.

The limiter's counters are touched only from the event loop thread, so they need no lock.
"""

from __future__ import annotations

import json
from collections import Counter

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmstack.api.auth import Caller
from glmstack.api.errors import PlatformError


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
    def __init__(self, *, per_key: int, total: int) -> None:
        self.per_key = per_key  # the default for keys without their own concurrency_limit
        self.total = total  # generations admitted at once, across all keys
        self._active: Counter[str] = Counter()
        self._total_active = 0

    @property
    def active(self) -> int:
        return self._total_active

    def acquire(self, caller: Caller) -> Lease:
        key = caller.key_id or ""
        limit = caller.concurrency_limit or self.per_key
        if self._active[key] >= limit:
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
    streams in (chunked uploads declare no length), so an oversized body is never held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
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
