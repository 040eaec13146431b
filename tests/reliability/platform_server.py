"""The real server for the platform reliability tests, and what they share.

`glmstack serve` runs on the bundled model in a child process and is watched from outside: its RSS and open
files through psutil, its queue and KV figures through /metrics. A TCP relay in front of PostgreSQL can pull
the plug on it. The profile says how hard to push: "quick" runs in every plain `pytest` run, "full" is what
benchmarks/bench_reliability.py runs (GLMSTACK_RELIABILITY_PROFILE=full). The figures the tests measure are
printed at the end of the run and, with GLMSTACK_RELIABILITY_REPORT=<file>, written there as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from servers import launch_serve, parse_metrics

from glmstack.store import Store

PROFILE_ENV = "GLMSTACK_RELIABILITY_PROFILE"
REPORT_ENV = "GLMSTACK_RELIABILITY_REPORT"
# Stopping the real PostgreSQL cluster affects everything else using it, so the quick profile cuts a relay
# instead unless this is set to 1 (the full profile stops the cluster).
STOP_POSTGRES_ENV = "GLMSTACK_RELIABILITY_STOP_POSTGRES"
CHAT = "/api/paas/v4/chat/completions"
# Replies of the servers that take many small requests (field bounds, credentials, generated cases) stay this
# short, so that the requests among them that pass validation finish fast.
API_MAX_TOKENS = 8


@dataclass(frozen=True)
class Profile:
    name: str
    load_streams: int  # also the server's queue bound (GLMSTACK_MAX_QUEUE)
    load_seconds: float
    load_max_tokens: int
    disconnect_trials: int  # per phase
    drops: int  # disconnects whose RSS cost is measured
    schema_cases: int  # schemathesis cases per database
    outage_seconds: float
    stop_postgres: bool  # pg_ctlcluster stop/start rather than cutting a relay


PROFILES = {
    "quick": Profile("quick", 16, 120, 24, 8, 60, 500, 6, False),  # the quick profile
    "full": Profile("full", 32, 600, 64, 30, 1000, 2000, 30, True),
}


def profile() -> Profile:
    name = os.environ.get(PROFILE_ENV, "quick")
    if name not in PROFILES:
        raise pytest.UsageError(f"{PROFILE_ENV} must be one of {', '.join(PROFILES)}, got {name!r}")
    chosen = PROFILES[name]
    if os.environ.get(STOP_POSTGRES_ENV) == "1":
        chosen = replace(chosen, stop_postgres=True)
    return chosen


# ---- figures ----------------------------------------------------------------------------------------------

FIGURES: dict[str, dict[str, Any]] = {}


def record(section: str, **figures: Any) -> None:
    FIGURES.setdefault(section, {}).update(figures)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def write_report() -> None:
    path = os.environ.get(REPORT_ENV)
    if path and FIGURES:
        Path(path).write_text(json.dumps({"profile": profile().name, **FIGURES}, indent=2) + "\n")


# ---- the server -------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    key: str  # "id.secret"
    proc: subprocess.Popen
    home: Path
    database_url: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def open_files(self) -> int:
        return self.process.num_fds()

    def fd_targets(self) -> list[str]:
        """What the open descriptors point at (files, sockets, pipes), for failure messages."""
        targets = []
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:  # closed meanwhile
                pass
        return sorted(targets)

    def chat(self, timeout: float = 120, **body: Any) -> httpx.Response:
        body = {"model": "glm-4", "messages": [{"role": "user", "content": "Say hi."}], **body}
        return httpx.post(self.url + CHAT, json=body, headers=self.auth, timeout=timeout)

    @functools.cached_property
    def _scraper(self) -> httpx.Client:
        # One kept-alive client: a new one per scrape costs the machine more than the scrape itself, and
        # polling /metrics must disturb the engine it watches as little as possible.
        return httpx.Client(base_url=self.url, headers=self.auth, timeout=30)

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics (engine gauges, requests in flight) and the labelled ones by
        their full name, e.g. 'glmstack_completions_total{finish_reason="abort"}'."""
        return parse_metrics(self._scraper.get("/metrics").text)

    def busy(self, samples: dict[str, float] | None = None) -> dict[str, float]:
        """What is still held: generations admitted, requests known to the engine, KV blocks in use."""
        samples = samples or self.metrics()
        names = (
            "glmstack_requests_in_flight",
            "glmstack_engine_running",
            "glmstack_engine_waiting",
            "glmstack_engine_kv_blocks_in_use",
        )
        return {n.removeprefix("glmstack_"): samples[n] for n in names if samples.get(n)}

    def wait_until(self, condition: Callable[[dict[str, float]], bool], timeout: float) -> float:
        """Polls /metrics until `condition(samples)`; returns the seconds it took. Raises on timeout."""
        started = time.perf_counter()
        while True:
            samples = self.metrics()
            if condition(samples):
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                raise AssertionError(f"not reached within {timeout} s; /metrics says {self.busy(samples)}")
            time.sleep(0.02)  # each scrape takes the server's CPU from the engine being watched

    def wait_idle(self, timeout: float = 60) -> float:
        return self.wait_until(lambda samples: not self.busy(samples), timeout)


def new_key(database_url: str, home: Path, name: str) -> str:
    with Store(database_url, home=home) as store:
        return store.keys.create(name)[1]


def start_server(home: Path, database_url: str, env: dict[str, str] | None = None) -> Server:
    """`glmstack serve` on a free port, with one API key. Its log is home/server.log."""
    home.mkdir(parents=True, exist_ok=True)
    key = new_key(database_url, home, "reliability")
    proc, url = launch_serve(
        ["--port", "0", "--device", "cpu"],
        {
            **os.environ,
            "GLMSTACK_HOME": str(home),
            "GLMSTACK_DATABASE_URL": database_url,
            "GLMSTACK_LOG_LEVEL": "INFO",
            **(env or {}),
        },
        home / "server.log",
    )
    return Server(url, key, proc, home, database_url)


def stop_server(server: Server) -> None:
    if "_scraper" in server.__dict__:
        server._scraper.close()
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@contextmanager
def running_server(home: Path, database_url: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(home, database_url, env)
    try:
        yield server
    finally:
        stop_server(server)


# ---- PostgreSQL -------------------------------------------------------------------------------------------


# ---- raw HTTP, for disconnects ------------------------------------------------------------------------------


def open_request(server: Server, body: dict[str, Any], path: str = CHAT) -> socket.socket:
    """Sends a POST on a fresh connection and returns the socket, unread: closing it is the disconnect."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {server.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 60) -> bytes:
    """Reads until `marker` has arrived (e.g. the first `data:` event)."""
    sock.settimeout(timeout)
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}: {received[-500:]!r}")
        received += chunk
    return received
