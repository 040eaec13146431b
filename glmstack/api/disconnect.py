"""Noticing a client that hung up, so its generation is aborted and its slot freed (the engine aborts a
request when the async iteration of `engine.generate` is cancelled or closed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client closes the connection. Only for use once the request body has been read:
    from then on the server's next message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first (then raises ClientDisconnect)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let the cancellation run its cleanup
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()
