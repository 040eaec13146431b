"""Run one call in a forked child, under a time and memory limit, and report how it ended.

The parent has already imported torch and glmstack, so a forked child costs a few tens of milliseconds. The
child reports the error type and message, its own time and peak RSS through a pipe; the parent watches the
child's RSS and the clock and kills it when either runs past its limit, so a hang or a runaway allocation
fails one test instead of the machine.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

TIME_LIMIT_S = 5.0
RSS_LIMIT = 512 * 2**20
REPORTS = pytest.StashKey[list]()  # (case, ChildReport) for the terminal summary


@dataclass
class ChildReport:
    error: str  # the exception's type name; "" when the call returned
    message: str
    seconds: float
    start_rss: int  # the child's RSS when it began (pages it shares with the parent count)
    peak_rss: int
    exitcode: int | None  # negative: killed by that signal
    killed: str = ""  # why the parent killed it, if it did

    @property
    def growth(self) -> int:
        """What the call itself added to the child's RSS."""
        return self.peak_rss - self.start_rss


def rss(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the child has exited
        pass
    return 0


def _child(sender: Connection, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    torch.set_num_threads(1)  # the parent's thread pool does not survive fork
    start_rss = rss()
    started = time.perf_counter()
    try:
        func(*args, **kwargs)
        error, message = "", ""
    except BaseException as exc:  # report whatever it was
        error, message = type(exc).__name__, str(exc)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sender.send((error, message, seconds, start_rss, peak))
    sender.close()


def run_in_child(func: Callable[..., Any], *args: Any, **kwargs: Any) -> ChildReport:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, func, args, kwargs), daemon=True)
    child.start()
    sender.close()
    deadline = time.monotonic() + TIME_LIMIT_S
    baseline = rss(child.pid)
    result, killed = None, ""
    while result is None and not killed:
        if receiver.poll(0.02):
            try:
                result = receiver.recv()
            except EOFError:  # died without a word (a signal, or os._exit)
                break
        elif time.monotonic() > deadline:
            killed = f"still running after {TIME_LIMIT_S} s"
        elif rss(child.pid) - baseline > RSS_LIMIT:
            killed = f"RSS grew past {RSS_LIMIT // 2**20} MB"
    if killed:
        child.kill()
    child.join(TIME_LIMIT_S)
    if child.is_alive():  # reported, then hung on the way out
        child.kill()
        child.join()
        killed = killed or "did not exit after reporting"
    receiver.close()
    error, message, seconds, start_rss, peak = result or ("", "", TIME_LIMIT_S, baseline, rss(child.pid))
    return ChildReport(error, message, seconds, start_rss, peak, child.exitcode, killed)
