"""Server-sent events as the SDKs parse them (spec §1.12, sdk-wire §4): every event is `data: <compact
JSON>` followed by a blank line — without the blank line the SDKs silently drop the event — and the stream
ends with `data: [DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from glmstack.api.disconnect import wait_for_disconnect

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
    )


class EventStreamResponse(Response):
    """Streams `events` while listening for the client to hang up; a hang-up cancels the iteration (which
    aborts the generation feeding it). `on_close` runs exactly once however the stream ends — also when it
    never started — so whatever the stream holds is released."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str] | None = None,
    ) -> None:
        # Not Response.__init__: it would add "content-length: 0" for the missing body.
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self._stream(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-write
            pass
