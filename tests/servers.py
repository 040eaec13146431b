"""Test helpers shared by the store, API and reliability suites: launching `glmstack serve` as a child
process, an app served by uvicorn on a real socket in this process (LiveServer, for SDKs and browsers), and a
TCP relay that can cut a database connection the way an outage does."""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from glmstack.api.h11_envelope import EnvelopeH11Protocol

STARTUP_TIMEOUT_S = 240  # loading the bundled model on a busy 2-core machine


def wait_for(check: Callable[[], Any], timeout: float = 300, every: float = 0.05) -> Any:
    """Polls `check` every `every` seconds until it returns something truthy, which is returned; failing the
    test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)
    return value


def launch_serve(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """Starts `glmstack serve ARGS` and returns the process with the URL its banner prints; its stderr goes
    to `log`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmstack.cli.main", "serve", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if match := re.match(r"glmstack is serving \S+ at (http://\S+)", line):
            return proc, match.group(1)
    proc.kill()
    raise AssertionError(f"server did not start:\n{log.read_text()[-3000:]}")


@contextmanager
def serving(args: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`glmstack serve ARGS` for the block: (process, URL); terminated (killed if it will not stop) after."""
    proc, url = launch_serve(args, env, log)
    try:
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text page by its full name, labels included
    (e.g. 'glmstack_completions_total{finish_reason="abort"}')."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


class Relay:
    """A TCP relay in front of PostgreSQL. `down()` refuses new connections and cuts the open ones, as a
    stopped database does; `up()` serves again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.up()

    def url_for(self, database_url: str) -> str:
        import sqlalchemy as sa

        url = sa.engine.make_url(database_url).set(host="127.0.0.1", port=self.port)
        return url.render_as_string(hide_password=False)

    def up(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for s in list(self._sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL for a private, empty schema in the PostgreSQL at $GLMSTACK_TEST_POSTGRES_URL (`scripts/postgres.sh`
    starts one and prints the URL; `.ci/run` exports it); skips without one. Every connection made with the
    URL sees only the new schema, so tests cannot see each other's rows."""
    base = os.environ.get("GLMSTACK_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("GLMSTACK_TEST_POSTGRES_URL is not set; `bash scripts/postgres.sh` prints one")
    import sqlalchemy as sa

    from glmstack.store.db import normalize_url

    url, schema = normalize_url(base), f"test_{uuid.uuid4().hex[:16]}"
    # pool_pre_ping: the schema is dropped after a test that may have restarted the server
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        # public stays on the path: pgvector's `vector` type lives there (scripts/postgres.sh creates it once)
        yield url.update_query_dict({"options": f"-csearch_path={schema},public"}).render_as_string(
            hide_password=False
        )
        with admin.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '10s'")
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
    finally:
        admin.dispose()


class LiveServer:
    """An ASGI app served by uvicorn (with glmstack's h11 envelope) on 127.0.0.1, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, http=EnvelopeH11Protocol, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
