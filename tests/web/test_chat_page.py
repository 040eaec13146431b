"""The chat page at `/` on an open server (loopback, no keys), in headless Chromium: streaming, stop, resume
after a reload, switching, rename, delete, search, export, regenerate and the settings that reach the model."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest
from conftest import current_id, send, wait_done
from servers import parse_metrics

pytestmark = pytest.mark.slow

SHORT = {"max_tokens": 12, "temperature": 0}
ABORTED = 'glmstack_completions_total{finish_reason="abort"}'

# Records the length of the newest reply's text at every DOM change, so a test can see it grow.
WATCH_GROWTH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('article.assistant .content');
    if (replies.length) window.lengths.push(replies[replies.length - 1].textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def aborted_count(server, until: float | None = None) -> float:
    """The server's count of aborted completions; with `until`, polled (up to a minute) until it gets there:
    the server notices the closed connection a moment after the page has moved on."""
    deadline = time.monotonic() + 60
    while True:
        count = parse_metrics(httpx.get(server.url + "/metrics", timeout=30).text).get(ABORTED, 0)
        if until is None or count >= until or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def test_a_reply_streams_into_the_page_and_is_stored(server, open_page, shot) -> None:
    page = open_page(server, settings={"max_tokens": 60, "temperature": 0})
    page.wait_for_selector("#model option", state="attached")
    page.evaluate(WATCH_GROWTH)
    send(page, "Name three colours of the rainbow.")
    page.wait_for_selector("article.assistant.streaming")
    shot(page, "streaming")
    wait_done(page)
    shot(page, "streamed")
    lengths = [n for n in page.evaluate("window.lengths") if n > 0]
    assert len(set(lengths)) >= 3, lengths  # seen growing, several times, before the end
    assert lengths == sorted(lengths)
    reply = page.inner_text("article.assistant .content")
    stored = server.conversation(current_id(page))
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["content"] == "Name three colours of the rainbow."
    assert stored["messages"][1]["meta"]["finish_reason"] in ("stop", "length")
    assert stored["messages"][1]["meta"]["usage"]["completion_tokens"] > 0
    assert reply.strip() and stored["title"] == "Name three colours of the rainbow."


def test_stop_aborts_the_generation_and_keeps_the_partial_reply(server, open_page, shot) -> None:
    before = aborted_count(server)
    page = open_page(server, settings={"max_tokens": 2000, "temperature": 0})
    send(page, "Write a long story about a dragon and a knight.")
    page.wait_for_function(
        "() => document.querySelector('article.assistant .content')?.textContent.length > 20", timeout=180_000)
    page.click("#stop")
    page.wait_for_selector("#send:not([hidden])")
    page.wait_for_selector("article.assistant .regenerate")  # stored
    shot(page, "stopped")
    conversation_id = current_id(page)
    partial = server.conversation(conversation_id)["messages"][-1]
    assert partial["role"] == "assistant" and partial["meta"]["finish_reason"] == "abort"
    assert len(partial["content"]) > 20
    # the server stopped generating: the engine counts an aborted completion
    assert aborted_count(server, until=before + 1) == before + 1
    assert page.inner_text("article.assistant .meta").endswith("stopped")
    # and the conversation goes on
    page.click("#toggle-settings")
    page.fill("#max-tokens", "8")
    send(page, "Thanks. Say hello.")
    wait_done(page)
    messages = server.conversation(conversation_id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"] == partial["content"]


def test_a_reload_resumes_the_conversation_and_the_list_finds_it(server, open_page) -> None:
    word = f"zebra{uuid.uuid4().hex[:6]}"
    page = open_page(server, settings=SHORT)
    send(page, f"Remember the word {word}.")
    wait_done(page)
    conversation_id = current_id(page)
    reply = page.inner_text("article.assistant .content")
    page.reload()
    page.wait_for_selector("article.assistant .content")
    assert page.inner_text("article.user .bubble") == f"Remember the word {word}."
    assert page.inner_text("article.assistant .content") == reply
    assert page.inner_text("#conversation-title") == f"Remember the word {word}."
    # another browser (a fresh context: nothing in its storage) finds it in the list
    other = open_page(server)
    other.click(f"#conversations li[data-id='{conversation_id}'] .conversation-link")
    other.wait_for_selector("article.assistant .content")
    assert other.inner_text("article.user .bubble") == f"Remember the word {word}."


def test_switching_between_conversations(server, open_page) -> None:
    first = server.seed("Apples", [{"role": "user", "content": "About apples"},
                                   {"role": "assistant", "content": "Apples are **red**."}])
    second = server.seed("Pears", [{"role": "user", "content": "About pears"},
                                   {"role": "assistant", "content": "Pears are green."}])
    page = open_page(server)
    for conversation_id, text in ((first, "Apples are red."), (second, "Pears are green."),
                                  (first, "Apples are red.")):
        page.click(f"#conversations li[data-id='{conversation_id}'] .conversation-link")
        page.wait_for_function("(t) => document.querySelector('article.assistant .content')?.innerText === t",
                               arg=text)
        assert page.evaluate("location.hash") == f"#c={conversation_id}"
        assert page.get_attribute(f"li[data-id='{conversation_id}'] .conversation-link", "aria-current") == "true"
    assert page.inner_html("article.assistant .content").count("<strong>red</strong>") == 1


# Counts the times the message list is emptied to the "new chat" state after a conversation was shown.
WATCH_CLEARED = """() => {
  window.cleared = 0;
  new MutationObserver(() => {
    if (!document.querySelector('#messages article')) window.cleared += 1;
  }).observe(document.getElementById('messages'), {childList: true});
}"""


def test_a_link_followed_while_the_page_loads_keeps_its_conversation(server, browser, open_page) -> None:
    conversation_id = server.seed("Figs", [{"role": "user", "content": "About figs"},
                                           {"role": "assistant", "content": "Figs are *sweet*."}])
    context = browser.new_context()
    context.set_default_timeout(120_000)
    held: list = []  # the page's start waits on the knowledge-base list: held here until the link is followed
    context.route("**/api/paas/v4/knowledge?*", lambda route: held.append(route))
    page = open_page(server, context=context)
    while not held:
        page.wait_for_timeout(20)
    page.goto(f"{server.url}/#c={conversation_id}")
    page.wait_for_selector("article.assistant .content em")
    page.evaluate(WATCH_CLEARED)
    for route in held:
        route.continue_()
    page.wait_for_function("() => !document.getElementById('send').disabled")
    assert page.evaluate("window.cleared") == 0
    assert page.inner_text("article.assistant .content") == "Figs are sweet."
    assert page.evaluate("location.hash") == f"#c={conversation_id}"
    context.close()


def test_rename_delete_and_search(server, open_page) -> None:
    tag = uuid.uuid4().hex[:8]
    keep = server.seed(f"Keep {tag}", [{"role": "user", "content": f"needle{tag} inside a message"}])
    drop = server.seed(f"Drop {tag}", [{"role": "user", "content": "nothing"}])
    page = open_page(server)
    page.click(f"li[data-id='{keep}'] .rename")
    page.fill(f"li[data-id='{keep}'] .rename-input", f"Renamed {tag}")
    page.press(f"li[data-id='{keep}'] .rename-input", "Enter")
    page.wait_for_selector(f"li[data-id='{keep}'] .conversation-link[title='Renamed {tag}']")
    assert server.conversation(keep)["title"] == f"Renamed {tag}"

    page.click(f"li[data-id='{drop}'] .delete")
    page.click("#confirm-ok")
    page.wait_for_selector(f"li[data-id='{drop}']", state="detached")
    assert httpx.get(f"{server.url}/api/glmstack/conversations/{drop}", timeout=30).status_code == 404

    page.fill("#search", f"needle{tag}")  # message text, not the title
    page.wait_for_function("(id) => [...document.querySelectorAll('#conversations li[data-id]')]"
                           ".map(li => li.dataset.id).join() === id", arg=keep)
    page.fill("#search", f"Renamed {tag}")
    page.wait_for_selector(f"li[data-id='{keep}']")
    page.fill("#search", f"absent{tag}")
    page.wait_for_selector("#conversations li.empty")


def test_export_as_json_and_markdown(server, open_page, tmp_path) -> None:
    conversation_id = server.seed("Export me", [{"role": "user", "content": "What is 2+2?"},
                                                {"role": "assistant", "content": "It is **4**."}])
    page = open_page(server)
    page.goto(f"{server.url}/#c={conversation_id}")
    page.wait_for_selector("article.assistant .content")
    saved = {}
    for format_, button in (("json", "#export-json"), ("markdown", "#export-markdown")):
        page.click("#export-menu summary")
        with page.expect_download() as download:
            page.click(button)
        path = tmp_path / download.value.suggested_filename
        download.value.save_as(path)
        saved[format_] = path.read_text()
    exported = json.loads(saved["json"])
    assert [m["content"] for m in exported["messages"]] == ["What is 2+2?", "It is **4**."]
    assert "What is 2+2?" in saved["markdown"] and "It is **4**." in saved["markdown"]


def test_regenerate_replaces_the_last_reply(server, open_page) -> None:
    conversation_id = server.seed("Regenerate", [{"role": "user", "content": "Say hi."},
                                                 {"role": "assistant", "content": "SEEDED REPLY"}],
                                  settings=SHORT)
    page = open_page(server, settings=SHORT)
    page.goto(f"{server.url}/#c={conversation_id}")
    page.wait_for_selector("article.assistant .regenerate")
    page.click("article.assistant .regenerate")
    page.wait_for_function("() => !document.body.innerText.includes('SEEDED REPLY')")
    wait_done(page)
    messages = server.conversation(conversation_id)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] != "SEEDED REPLY" and messages[1]["meta"]["usage"]["completion_tokens"] > 0


def test_a_reply_started_while_the_page_loads_is_kept(server, open_page) -> None:
    """A conversation opened by a link while the page is still starting shows its Regenerate button at once;
    the start-up's own opening of that conversation must not then abort the reply the user began (it did:
    the reply was cut off, or never stored)."""
    long = {"max_tokens": 120, "temperature": 0}
    conversation_id = server.seed("While loading", [
        {"role": "user", "content": "Count from 1 to 100, one number per line."},
        {"role": "assistant", "content": "SEEDED REPLY"}], settings=long)
    page = open_page(server, settings=long)
    held: list = []
    page.route("**/api/paas/v4/knowledge*", lambda route: held.append(route))  # start-up waits on these
    page.goto(server.url + "/")
    while not held:
        page.wait_for_timeout(20)
    page.evaluate(f"location.hash = '#c={conversation_id}'")  # the link, followed mid-start
    page.click("article.assistant .regenerate")
    page.wait_for_function("() => document.querySelector('article.assistant:last-of-type .content')"
                           "?.innerText.trim().length > 0")
    for route in held:  # start-up goes on while the reply streams
        route.fallback()
    deadline = time.monotonic() + 180
    while True:
        reply = server.conversation(conversation_id)["messages"][-1]
        if reply["content"] != "SEEDED REPLY" or time.monotonic() > deadline:
            break
        page.wait_for_timeout(100)
    assert reply["content"] != "SEEDED REPLY", "the reply was never stored"
    assert reply["meta"]["finish_reason"] in ("stop", "length"), reply["meta"]


def test_the_settings_reach_the_model(server, open_page) -> None:
    page = open_page(server)
    page.wait_for_selector("#model option", state="attached")
    models = httpx.get(server.url + "/api/paas/v4/models", timeout=30).json()["data"]
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [m["id"] for m in models]
    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are terse.")
    page.fill("#max-tokens", "5")
    page.eval_on_selector("#temperature", "e => { e.value = '0'; e.dispatchEvent(new Event('input')); }")
    page.eval_on_selector("#top-p", "e => { e.value = '0.5'; e.dispatchEvent(new Event('input')); }")
    # another name than the first (not a persona: those need their own `meta`)
    model = next(m["id"] for m in models[1:] if m["id"].startswith("glm-4"))
    page.select_option("#model", model)
    requests = []
    page.on("request", lambda r: requests.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
    send(page, "Tell me everything about the history of Rome.")
    wait_done(page)
    body = requests[0]
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == (model, 0, 0.5, 5)
    stored = server.conversation(current_id(page))
    reply = stored["messages"][-1]
    assert reply["meta"]["usage"]["completion_tokens"] <= 5 and reply["meta"]["finish_reason"] == "length"
    assert stored["system_prompt"] == "You are terse." and stored["settings"]["max_tokens"] == 5
    page.reload()  # the conversation brings its settings back
    page.wait_for_selector("article.assistant .content")
    assert page.input_value("#max-tokens") == "5" and page.input_value("#system-prompt") == "You are terse."
