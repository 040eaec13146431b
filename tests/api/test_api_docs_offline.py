"""/docs in a real headless Chromium with the network off: the API documentation is served by glmstack itself
(FastAPI's default page loads Swagger UI from a CDN and is blank offline). Playwright drives Debian's chromium
(`executable_path`; no browser download); the test skips where either is missing (.ci/run installs both)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from scripted import ScriptedEngine
from servers import LiveServer

from glmstack.api import create_app
from glmstack.settings import Settings
from glmstack.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with Store(f"sqlite:///{tmp_path / 'db.sqlite'}", home=tmp_path) as store:
        live = LiveServer(create_app(Settings(home=tmp_path, database_url="unused"), ScriptedEngine(), store))
        try:
            yield live.url
        finally:
            live.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_api_docs_render_with_the_network_off(server: str, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    outside: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()

        def offline(route) -> None:  # everything not served by glmstack fails, as without a network
            if route.request.url.startswith(server):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", offline)
        page.goto(f"{server}/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        text = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)
        browser.close()
    assert outside == []
    for path in ("/api/paas/v4/chat/completions", "/api/paas/v4/embeddings", "/api/paas/v4/files",
                 "/api/paas/v4/knowledge"):
        assert path in text
