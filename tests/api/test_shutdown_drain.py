"""Drain: the shutdown's state as the platform and its jobs read it (api/shutdown.py). The end-to-end
behaviour at SIGTERM is tests/reliability/test_shutdown.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from glmstack.api.shutdown import CUT_DETAIL, Drain, deadline_error


def test_not_draining_until_begun() -> None:
    drain = Drain(5)
    assert (drain.draining, drain.deadline, drain.remaining()) == (False, None, None)


def test_begin_sets_the_deadline_once() -> None:
    drain = Drain(5)
    before = time.monotonic()
    drain.begin()
    deadline = drain.deadline
    assert drain.draining and deadline is not None and before + 5 <= deadline <= time.monotonic() + 5
    remaining = drain.remaining()
    assert remaining is not None and 0 < remaining <= 5
    drain.begin()  # a second SIGTERM, or Ctrl+C after it, does not move the deadline
    assert drain.deadline == deadline


def test_remaining_is_zero_once_the_deadline_has_passed() -> None:
    drain = Drain(0)
    drain.begin()
    assert drain.remaining() == 0


def test_grace_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="grace_s must be at least 0"):
        Drain(-1)


def test_waiters_wake_when_draining_begins() -> None:
    async def run() -> tuple[bool, bool]:
        drain = Drain(60)
        started = asyncio.create_task(drain.wait_started())
        deadline = asyncio.create_task(drain.wait_deadline())
        await asyncio.sleep(0.05)
        assert not started.done()
        drain.begin()
        await asyncio.wait_for(started, 5)
        await asyncio.sleep(0.05)
        deadline_passed = deadline.done()
        deadline.cancel()
        return started.done(), deadline_passed

    assert asyncio.run(run()) == (True, False)  # draining, but 60 s from the deadline


def test_begun_from_a_signal_handler() -> None:
    """As uvicorn calls it: from a signal handler, which the event loop's thread runs between two bytecodes
    of whatever it was doing, here while a waiter sleeps in the loop."""

    async def run() -> bool:
        drain = Drain(0.2)
        loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGUSR1, lambda *_: drain.begin())
        try:
            waiter = asyncio.create_task(drain.wait_deadline())
            await asyncio.sleep(0.05)
            loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
            await asyncio.wait_for(waiter, 10)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        deadline = drain.deadline
        return deadline is not None and time.monotonic() >= deadline

    assert asyncio.run(run())


def test_wait_deadline_returns_only_after_the_deadline() -> None:
    async def run() -> tuple[float, float]:
        drain = Drain(0.3)
        drain.begin()
        await drain.wait_started()  # already draining: returns at once
        await asyncio.wait_for(drain.wait_deadline(), 10)
        assert drain.deadline is not None
        return time.monotonic(), drain.deadline

    now, deadline = asyncio.run(run())
    assert now >= deadline


def test_wait_deadline_never_returns_while_not_draining() -> None:
    async def run() -> None:
        await asyncio.wait_for(Drain(0).wait_deadline(), 0.3)

    with pytest.raises(TimeoutError):
        asyncio.run(run())


def test_begun_outside_any_event_loop() -> None:
    drain = Drain(0)
    drain.begin()  # e.g. by code that runs before the server's loop does
    asyncio.run(asyncio.wait_for(drain.wait_deadline(), 5))


def test_the_error_of_a_cut_reply() -> None:
    error = deadline_error("chatcmpl-1")
    body = error.body()
    assert error.http_status == 500 and body["error"]["code"] == "1234"
    assert "chatcmpl-1" in body["error"]["message"] and CUT_DETAIL in body["error"]["message"]
