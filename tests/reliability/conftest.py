"""The reliability suite runs in every plain `pytest` run (it is part of the quick profile); the summary says
how close the slowest and largest refusals came to their limits."""

from __future__ import annotations

import pytest
from forked_child import REPORTS, RSS_LIMIT, TIME_LIMIT_S


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: hostile inputs refused in bounded time and memory")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    reports = config.stash.get(REPORTS, [])
    if not reports:
        return
    slowest = max(reports, key=lambda item: item[1].seconds)
    largest = max(reports, key=lambda item: item[1].growth)
    terminalreporter.write_line(
        f"hostile inputs: {len(reports)} refused in forked children; slowest {slowest[1].seconds:.3f} s "
        f"({slowest[0]}, limit {TIME_LIMIT_S:g} s); largest RSS growth {largest[1].growth / 2**20:.1f} MB "
        f"({largest[0]}, peak {largest[1].peak_rss / 2**20:.0f} MB; limit {RSS_LIMIT // 2**20} MB)"
    )
