"""The reliability suite runs in every plain `pytest` run (it is part of the quick profile); the summary says
how close the slowest and largest refusals came to their limits, and what the platform tests measured."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from forked_child import REPORTS, RSS_LIMIT, TIME_LIMIT_S
from platform_server import (
    API_MAX_TOKENS,
    FIGURES,
    Server,
    profile,
    running_server,
    write_report,
)
from servers import postgres_schema


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: hostile inputs refused in bounded time and memory")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    write_report()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = config.stash.get(REPORTS, [])
    if reports:
        slowest = max(reports, key=lambda item: item[1].seconds)
        largest = max(reports, key=lambda item: item[1].growth)
        terminalreporter.write_line(
            f"hostile inputs: {len(reports)} refused in forked children; slowest {slowest[1].seconds:.3f} s "
            f"({slowest[0]}, limit {TIME_LIMIT_S:g} s); largest RSS growth {largest[1].growth / 2**20:.1f} "
            f"MB ({largest[0]}, peak {largest[1].peak_rss / 2**20:.0f} MB; limit {RSS_LIMIT // 2**20} MB)"
        )
    for section, figures in FIGURES.items():
        terminalreporter.write_line(f"platform {section} ({profile().name}): {json.dumps(figures)}")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def api_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server with replies capped at API_MAX_TOKENS, on SQLite and on PostgreSQL: for the tests that
    send many small, mostly refused requests (field bounds, credentials, generated cases)."""
    home = tmp_path_factory.mktemp(f"api-{request.param}")
    env = {"GLMSTACK_MAX_TOKENS_CAP": str(API_MAX_TOKENS), "GLMSTACK_LOG_LEVEL": "WARNING"}
    if request.param == "sqlite":
        with running_server(home, f"sqlite:///{home / 'glmstack.db'}", env) as server:
            yield server
        return
    with postgres_schema() as url, running_server(home, url, env) as server:
        yield server
