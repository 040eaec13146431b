"""Graceful shutdown: what the platform knows between SIGTERM and the end of the process.

`glmstack serve` calls `Drain.begin()` from uvicorn's signal handler. From then on uvicorn takes no new work:
it closes the listening sockets (new connections are refused), closes idle kept-alive connections, and marks
busy ones `Connection: close`, so no further request is read on them once their reply is done. Nothing new
therefore reaches the app while draining, and no 503 is needed. What is already running continues normally
until the deadline, `grace_s` after `begin()`: a generation still running then is aborted in the engine and
its reply ends with error 1234 (services/generation.py and services/chat.py). Background work (jobs) reads
`draining` to stop taking more and `wait_deadline()` to know when to checkpoint.
"""

from __future__ import annotations

import asyncio
import time

from glmstack.api.errors import PlatformError

CUT_DETAIL = "the server is shutting down: this reply was cut at the shutdown deadline"


class Drain:
    """The shutdown's state: not draining, then draining until a deadline (time.monotonic() based).

    Used from the event loop's thread only, which is also where uvicorn's signal handler runs."""

    def __init__(self, grace_s: float) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be at least 0, got {grace_s}")
        self.grace_s = grace_s
        self._deadline: float | None = None
        self._started = asyncio.Event()  # bound to a loop by its first waiter, not here

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    @property
    def deadline(self) -> float | None:
        """When in-flight work is cut, on the time.monotonic() clock; None while not draining."""
        return self._deadline

    def remaining(self) -> float | None:
        """Seconds left until the deadline (0 once it has passed); None while not draining."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def begin(self) -> None:
        """Starts draining; a second call (another SIGTERM, a SIGINT) changes nothing."""
        if self._deadline is not None:
            return
        self._deadline = time.monotonic() + self.grace_s
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs in this thread, so no waiter can be half-way into Event.wait
            self._started.set()
            return
        # A signal handler runs between two bytecodes of whatever the loop was doing, possibly inside
        # Event.wait between its check and its append of a waiter; setting the event from a callback of its
        # own keeps the event consistent (and wakes a loop that sleeps in select). `draining` is already true.
        loop.call_soon_threadsafe(self._started.set)

    async def wait_started(self) -> None:
        """Returns once draining."""
        if not self.draining:
            await self._started.wait()

    async def wait_deadline(self) -> None:
        """Returns once the deadline has passed; never returns while not draining."""
        await self.wait_started()
        while left := self.remaining():
            await asyncio.sleep(left)


def deadline_error(request_id: str) -> PlatformError:
    """The error of a reply cut at the deadline: the documented 1234 ("network error, error id ..."), with
    the reason appended so that a client can tell a shutdown from a failure of the model."""
    return PlatformError(1234, CUT_DETAIL, error_id=request_id)
