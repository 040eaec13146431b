"""The web chat page in a real headless Chromium against a real `glmstack serve` with the bundled model.

Playwright drives Debian's chromium (`executable_path`; no browser download); the tests skip where either is
missing (.ci/run installs both). Every page runs offline: a request to anything but the server fails and is
recorded, so a test also proves the page loads nothing from a CDN. Each test gets a fresh browser context
(no saved key, no saved settings); servers are shared per module, so tests make their own conversations
with their own words and never count on an empty list.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import launch_serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CONVERSATIONS = "/api/glmstack/conversations"


def _env(home: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("GLMSTACK_")}
    return env | {"GLMSTACK_HOME": str(home), "GLMSTACK_PORT": "0"}


@dataclass
class Server:
    url: str
    keys: list[str] = field(default_factory=list)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def conversation(self, conversation_id: str, key: str | None = None) -> dict[str, Any]:
        response = httpx.get(f"{self.url}{CONVERSATIONS}/{conversation_id}", headers=self.headers(key), timeout=30)
        response.raise_for_status()
        return response.json()

    def conversations(self, q: str = "", key: str | None = None) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}{CONVERSATIONS}", params={"q": q, "limit": 100},
                             headers=self.headers(key), timeout=30)
        response.raise_for_status()
        return response.json()["data"]

    def seed(self, title: str, messages: list[dict[str, Any]], key: str | None = None,
             settings: dict[str, Any] | None = None) -> str:
        """A stored conversation with these messages, made through the API (the model's output plays no part)."""
        created = httpx.post(f"{self.url}{CONVERSATIONS}", json={"title": title, "settings": settings},
                             headers=self.headers(key), timeout=30)
        created.raise_for_status()
        conversation_id = created.json()["id"]
        httpx.post(f"{self.url}{CONVERSATIONS}/{conversation_id}/messages", json={"messages": messages},
                   headers=self.headers(key), timeout=30).raise_for_status()
        return conversation_id


def _serve(tmp: Path, keys: int) -> Iterator[Server]:
    home = tmp / "home"
    env = _env(home)
    created = []
    for _ in range(keys):  # keys made before the server starts: it serves with auth on
        done = subprocess.run([sys.executable, "-m", "glmstack.cli", "keys", "create"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        created.append(done.stdout.strip())
    proc, url = launch_serve([], env, tmp / "server.log")
    try:
        yield Server(url, created)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`glmstack serve` as the README starts it: loopback, no keys, so open."""
    yield from _serve(tmp_path_factory.mktemp("open"), keys=0)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`glmstack serve` after `glmstack keys create` twice: every API call needs one of the two keys."""
    yield from _serve(tmp_path_factory.mktemp("keyed"), keys=2)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@dataclass
class Browsing:
    outside: list[str] = field(default_factory=list)  # requests to anywhere but the server (all refused)
    errors: list[str] = field(default_factory=list)  # uncaught page errors


@pytest.fixture
def open_page(browser: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """open_page(server, width=1280, height=800, settings=None): a page of a fresh context on the server's
    `/`, offline but for the server; `settings` pre-sets the page's remembered settings (the last ones used)."""
    contexts = []
    pages = []
    browsing = Browsing()

    def open_(server: Server, width: int = 1280, height: int = 800, settings: dict | None = None,
              context: Any = None) -> Any:
        if context is None:
            context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True,
                                          reduced_motion="reduce")
            contexts.append(context)
            # Playwright's 30 s default is for a quiet machine: CI runs these beside servers and model loads
            context.set_default_timeout(120_000)
            if settings is not None:
                context.add_init_script(
                    f"localStorage.setItem('glmstack.settings', {json.dumps(json.dumps(settings))})")

            def offline(route: Any) -> None:
                if route.request.url.startswith(server.url):
                    route.continue_()
                else:
                    browsing.outside.append(route.request.url)
                    route.abort()

            context.route("**/*", offline)
        page = context.new_page()
        pages.append(page)
        page.on("pageerror", lambda error: browsing.errors.append(str(error)))
        page.goto(server.url + "/")
        return page

    open_.browsing = browsing  # type: ignore[attr-defined]
    yield open_
    for n, page in enumerate(pages):  # how each page was left, for a look after a failure
        if not page.is_closed():
            page.screenshot(path=str(tmp_path / f"final-{n}.png"))
    for context in contexts:
        context.close()
    assert browsing.outside == [], "the page asked for something outside glmstack"
    assert browsing.errors == [], "the page threw"


@pytest.fixture
def shot(tmp_path: Path) -> Callable[[Any, str], Path]:
    """shot(page, name): a screenshot kept under the test's tmp dir."""

    def take(page: Any, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path))
        return path

    return take


# ---- what the tests do on the page ---------------------------------------------------------------------------

def send(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def wait_done(page: Any, timeout_ms: int = 180_000) -> None:
    """Until the reply has ended and been stored (the page shows the stored messages: Regenerate is back)."""
    page.wait_for_selector("#send:not([hidden])", timeout=timeout_ms)
    page.wait_for_selector("article.assistant:last-of-type .regenerate", timeout=timeout_ms)


def current_id(page: Any) -> str:
    page.wait_for_function("() => location.hash.startsWith('#c=')", timeout=30_000)
    return page.evaluate("new URLSearchParams(location.hash.slice(1)).get('c')")
