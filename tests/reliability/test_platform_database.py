"""The database under pressure (issue 7, test 7): many writers at once never see "database is locked"; a
PostgreSQL outage makes the requests that need it fail fast in the envelope, /health says so, and the server
recovers on its own when the database is back.

The outage cuts a relay in front of PostgreSQL in the quick profile; the full profile (or
GLMSTACK_RELIABILITY_STOP_POSTGRES=1) stops the real cluster with pg_ctlcluster and starts it again, whatever
happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from platform_server import Server, profile, record, running_server
from servers import Relay, postgres_schema

from glmstack.store import Store
from glmstack.store.keys import VERIFIED_TTL_S

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

PROFILE = profile()
WRITERS, ROWS, STORES = 32, 200, 8
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]


def test_concurrent_writers(database_url: str, tmp_path: Path) -> None:
    """32 threads through 8 Stores (8 engines, as if 8 processes), 200 rows each plus a key each."""
    stores = [Store(database_url, home=tmp_path) for _ in range(STORES)]
    key, _ = stores[0].keys.create("writers")
    errors: list[BaseException] = []
    start = threading.Barrier(WRITERS)

    def work(w: int) -> None:
        store = stores[w % STORES]
        try:
            start.wait()
            store.keys.create(f"writer {w}")
            for i in range(ROWS):
                store.usage.record(key.id if w % 2 else None, f"writer-{w}-row-{i}", 1, 2)
        except BaseException as e:  # collected and reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WRITERS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    try:
        locked = [e for e in errors if "locked" in str(e)]
        dialect = sa.engine.make_url(database_url).get_backend_name()
        record(
            f"writers_{dialect}",
            writers=WRITERS,
            rows=WRITERS * ROWS,
            errors=len(errors),
            locked=len(locked),
            seconds=round(elapsed, 1),
        )
        assert errors == [], errors[:3]
        report = stores[0].usage.report()
        assert len(report) == WRITERS * ROWS and {r.requests for r in report} == {1}
        assert len(stores[0].keys.list()) == WRITERS + 1
    finally:
        for s in stores:
            s.close()


# ---- PostgreSQL outage --------------------------------------------------------------------------------------


def _cluster_for(port: int) -> tuple[str, str]:
    if shutil.which("pg_lsclusters") is None:
        pytest.skip("stopping PostgreSQL needs Debian's pg_ctlcluster")
    for line in subprocess.run(
        ["pg_lsclusters", "-h"], capture_output=True, text=True, check=True
    ).stdout.splitlines():
        version, name, cluster_port, *_ = line.split()
        if int(cluster_port) == port:
            return version, name
    pytest.skip(f"no local cluster on port {port}")


def _outage(database_url: str) -> tuple[str, Callable[[], None], Callable[[], None]]:
    """(the URL the server should use, stop, start)."""
    url = sa.engine.make_url(database_url)
    if PROFILE.stop_postgres:
        version, name = _cluster_for(url.port or 5432)
        control = ["pg_ctlcluster", version, name]
        return (
            database_url,
            lambda: subprocess.run([*control, "stop", "-m", "fast"], check=True, timeout=60),
            lambda: subprocess.run([*control, "start"], check=True, timeout=60),
        )
    relay = Relay(url.host or "127.0.0.1", url.port or 5432)
    return relay.url_for(database_url), relay.down, relay.up


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def test_postgres_outage(tmp_path: Path) -> None:
    with postgres_schema() as direct_url:
        server_url, stop, start = _outage(direct_url)
        with running_server(tmp_path / "home", server_url, {"GLMSTACK_LOG_LEVEL": "WARNING"}) as server:
            _ride_out_an_outage(server, stop, start)


def _ride_out_an_outage(server: Server, stop: Callable[[], None], start: Callable[[], None]) -> None:
    assert server.chat(max_tokens=2).status_code == 200
    body = {"model": "glm-4", "messages": STORY, "max_tokens": 48, "do_sample": False, "stream": True}
    failures, healths = [], []
    with httpx.stream(
        "POST", server.url + "/api/paas/v4/chat/completions", json=body, headers=server.auth, timeout=120
    ) as running:
        lines = running.iter_lines()
        next(lines)
        stop()
        try:
            down_since = time.perf_counter()
            # A generation that was already admitted finishes: only its usage row is lost
            assert [line for line in lines if line][-1] == "data: [DONE]"
            # A key verified within VERIFIED_TTL_S is served without the database (the README's revocation
            # promise); the outage's requests start once that has run out, however fast the stream ended.
            time.sleep(max(0.0, VERIFIED_TTL_S - (time.perf_counter() - down_since)) + 0.1)
            while time.perf_counter() - down_since < PROFILE.outage_seconds:
                failures.append(_timed(lambda: server.chat(max_tokens=2)))
                healths.append(_timed(lambda: httpx.get(server.url + "/health", timeout=30)))
                time.sleep(0.5)
        finally:
            start()
    back = time.perf_counter()
    while (response := server.chat(max_tokens=2)).status_code != 200:
        assert time.perf_counter() - back < 10, response.text
        time.sleep(0.2)
    recovered = time.perf_counter() - back
    record(
        "postgres_outage",
        how="pg_ctlcluster stop" if PROFILE.stop_postgres else "relay cut",
        seconds=PROFILE.outage_seconds,
        requests=len(failures),
        slowest_failure_s=round(max(s for _, s in failures), 2),
        slowest_health_s=round(max(s for _, s in healths), 2),
        recovered_s=round(recovered, 2),
    )
    for response, seconds in failures:
        assert seconds <= 5 and response.status_code == 500, (seconds, response.status_code)
        assert response.json() == {"error": {"code": "1120", "message": response.json()["error"]["message"]}}
    for response, seconds in healths:
        assert seconds <= 5 and response.status_code == 503, (seconds, response.text)
        assert json.loads(response.text)["database"] is False
    assert httpx.get(server.url + "/health", timeout=30).json()["database"] is True
