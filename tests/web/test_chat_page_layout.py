"""How the chat page looks: at phone width (390x844) nothing scrolls sideways, the conversation list hides
behind a button, and sending works; on a desktop a Markdown reply with code renders highlighted with copy
buttons (the README's screenshot: GLMSTACK_WRITE_SCREENSHOT=1 writes it to docs/images/web-chat.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import current_id, send, wait_done

pytestmark = pytest.mark.slow


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"
                         " && document.body.scrollWidth <= window.innerWidth")


def test_the_page_fits_a_phone(server, open_page, shot) -> None:
    seeded = server.seed("Phone check", [
        {"role": "user", "content": "Show code"},
        {"role": "assistant", "content": "```python\n" + "x = 'a very long line of code' + " * 8 + "'end'\n```"}])
    page = open_page(server, width=390, height=844, settings={"max_tokens": 8, "temperature": 0})
    page.wait_for_selector("#model option", state="attached")
    assert not page.is_visible("#conversations")
    assert page.is_visible("#toggle-sidebar")
    assert no_sideways_scroll(page)
    shot(page, "phone-empty")

    send(page, "Hi there.")
    wait_done(page)
    conversation_id = current_id(page)
    assert no_sideways_scroll(page)
    shot(page, "phone-reply")

    page.click("#toggle-sidebar")
    page.wait_for_selector(f"#conversations li[data-id='{conversation_id}']")
    assert page.get_attribute("#toggle-sidebar", "aria-expanded") == "true"
    shot(page, "phone-list")
    page.click(f"#conversations li[data-id='{seeded}'] .conversation-link")
    page.wait_for_selector(".code-block")
    page.wait_for_selector("#conversations", state="hidden")  # the list closes once one is picked
    assert no_sideways_scroll(page)  # long code scrolls inside its block
    page.click("#toggle-settings")
    assert page.is_visible("#max-tokens") and no_sideways_scroll(page)
    shot(page, "phone-settings")


README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "web-chat.png"
REPLY = """Here is a small function that reverses the words of a sentence:

```python
def reverse_words(sentence: str) -> str:
    \"\"\"'hello big world' -> 'world big hello'\"\"\"
    return " ".join(reversed(sentence.split()))
```

It works in three steps:

1. **split** the sentence on whitespace,
2. `reversed()` walks the words from the end,
3. **join** puts them back together with single spaces.

| input | output |
| --- | --- |
| `hello big world` | `world big hello` |
"""


def test_a_markdown_reply_with_code_on_a_desktop(server, open_page, shot) -> None:
    conversation_id = server.seed("Reverse the words of a sentence", [
        {"role": "user", "content": "Write a Python function that reverses the words of a sentence."},
        {"role": "assistant", "content": REPLY, "meta": {"model": "glm-4", "finish_reason": "stop",
                                                          "usage": {"completion_tokens": 96}}}])
    server.seed("Summarise the release notes", [{"role": "user", "content": "Summarise these notes."}])
    server.seed("Plan a weekend in Hangzhou", [{"role": "user", "content": "Plan a weekend in Hangzhou."}])
    page = open_page(server, width=1280, height=860)
    page.goto(f"{server.url}/#c={conversation_id}")
    page.wait_for_selector(".code-block .hljs-keyword")  # highlighted
    assert page.inner_text(".code-block .code-language") == "python"
    assert page.is_visible(".code-block .copy-code")
    assert page.locator(".markdown table").count() == 1 and page.locator(".markdown ol li").count() == 3
    path = shot(page, "desktop-markdown")
    if os.environ.get("GLMSTACK_WRITE_SCREENSHOT") == "1":
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SHOT)
