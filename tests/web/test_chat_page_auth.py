"""The chat page on a server with keys (auth on): it asks for a key, refuses a wrong one with the server's
reason, and with the right one shows that key's conversations and no one else's."""

from __future__ import annotations

import httpx
import pytest
from conftest import current_id, send, wait_done

pytestmark = pytest.mark.slow


def test_the_page_asks_for_a_key_and_shows_only_that_keys_conversations(keyed_server, open_page, shot) -> None:
    mine, theirs = keyed_server.keys
    other = keyed_server.seed("Someone else's chat", [{"role": "user", "content": "private"}], key=theirs)
    assert httpx.get(keyed_server.url + "/api/glmstack/conversations", timeout=30).status_code == 401

    page = open_page(keyed_server, settings={"max_tokens": 8, "temperature": 0})
    page.wait_for_selector("#key-dialog[open]")
    shot(page, "asks-for-a-key")
    page.fill("#key-input", mine.split(".")[0] + ".wrongsecret")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:not([hidden])")
    assert page.inner_text("#key-error").startswith("That key was refused:")
    shot(page, "wrong-key")
    assert page.is_visible("#key-dialog")

    page.fill("#key-input", mine)
    page.click("#key-submit")
    page.wait_for_selector("#key-dialog", state="hidden")
    page.wait_for_selector("#conversations li.empty")  # this key has none yet; the other key's is not listed
    assert page.inner_text("#auth-status") == "Signed in with an API key"
    send(page, "Hello from my key.")
    wait_done(page)
    conversation_id = current_id(page)
    page.wait_for_selector(f"#conversations li[data-id='{conversation_id}']")
    listed = page.eval_on_selector_all("#conversations li[data-id]", "lis => lis.map(li => li.dataset.id)")
    assert listed == [conversation_id] and other not in listed
    assert [c["id"] for c in keyed_server.conversations(key=mine)] == [conversation_id]

    # the key is remembered: a reload goes straight back in
    page.reload()
    page.wait_for_selector("article.assistant .content")
    assert not page.is_visible("#key-dialog")
    shot(page, "signed-in")

    # the other key's conversation cannot be opened by URL either
    page.goto(f"{keyed_server.url}/#c={other}")
    page.wait_for_selector("#error-banner:not([hidden])")
    assert "private" not in page.inner_text("#messages")


def test_the_page_and_its_files_are_open_while_the_api_is_keyed(keyed_server) -> None:
    url = keyed_server.url
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for path, kind in (("/web/app.js", "text/javascript"), ("/web/vendor/purify.es.mjs", "text/javascript"),
                       ("/web/app.css", "text/css"), ("/web/vendor/LICENSE.marked", "text/plain")):
        response = httpx.get(url + path, timeout=30)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), path
    for path in ("/web/../pyproject.toml", "/web/%2e%2e/api/web_page.py", "/web/vendor/../../cli/main.py",
                 "/web/missing.js"):
        assert httpx.get(url + path, timeout=30).status_code == 404, path
    # the API is not: and `POST /` is still ChatGLM's classic api.py, keyed like the rest
    assert httpx.get(url + "/api/paas/v4/models", timeout=30).status_code == 401
    assert httpx.post(url + "/", json={"prompt": "hi", "history": []}, timeout=30).status_code == 401
