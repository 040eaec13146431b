"""The conversations API under /api/glmstack, as the web chat page uses it: create, append (and regenerate),
list and search, rename, export, delete; two keys never see each other's conversations, open mode needs no
key, and bad input is refused naming the field. On SQLite and PostgreSQL (the `database_url` fixture)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from glmstack.api.schemas.conversations import MAX_MESSAGES
from glmstack.store import Store
from glmstack.store.conversations import NewMessage

BASE = "/api/glmstack/conversations"


def assert_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error


def create(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post(BASE, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def append(client: TestClient, conversation_id: str, *messages: dict[str, Any], **extra: Any) -> httpx.Response:
    return client.post(f"{BASE}/{conversation_id}/messages", json={"messages": list(messages), **extra})


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_a_chat_page_session(client: TestClient):
    conv = create(client)
    assert conv["object"] == "conversation" and conv["title"] == "New chat" and conv["messages"] == []
    assert conv["id"].startswith("conv_") and conv["message_count"] == 0
    assert conv["model"] is None and conv["system_prompt"] is None and conv["settings"] is None
    assert isinstance(conv["created_at"], int) and conv["updated_at"] >= conv["created_at"]

    reply = {"role": "assistant", "content": "巴黎。", "reasoning_content": "首都……",
             "meta": {"model": "glm-4", "usage": {"prompt_tokens": 5, "completion_tokens": 3},
                      "finish_reason": "stop"}}
    answered = append(client, conv["id"], user("法国的首都？"), reply)
    assert answered.status_code == 200, answered.text
    body = answered.json()
    assert body["message_count"] == 2
    assert [(m["position"], m["role"], m["content"]) for m in body["messages"]] == [
        (0, "user", "法国的首都？"), (1, "assistant", "巴黎。")]
    assert body["messages"][1]["reasoning_content"] == "首都……"
    assert body["messages"][1]["meta"]["finish_reason"] == "stop"
    assert body["messages"][0]["tool_calls"] is None and isinstance(body["messages"][0]["created_at"], int)

    # regenerate: the reply at position 1 is replaced
    again = append(client, conv["id"], {"role": "assistant", "content": "Paris."}, replace_from=1).json()
    assert [m["content"] for m in again["messages"]] == ["法国的首都？", "Paris."]

    renamed = client.patch(f"{BASE}/{conv['id']}", json={"title": "首都", "settings": {"temperature": 0.2},
                                                         "model": "glm-4-flash"})
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["title"], renamed.json()["settings"], renamed.json()["model"]) == (
        "首都", {"temperature": 0.2}, "glm-4-flash")
    cleared = client.patch(f"{BASE}/{conv['id']}", json={"settings": None}).json()
    assert cleared["settings"] is None and cleared["title"] == "首都" and cleared["model"] == "glm-4-flash"

    got = client.get(f"{BASE}/{conv['id']}").json()
    assert got == cleared

    listed = client.get(BASE).json()
    assert listed["object"] == "list" and listed["has_more"] is False
    [summary] = listed["data"]
    assert summary == {"id": conv["id"], "object": "conversation", "title": "首都", "model": "glm-4-flash",
                       "created_at": got["created_at"], "updated_at": got["updated_at"], "message_count": 2}

    deleted = client.delete(f"{BASE}/{conv['id']}")
    assert deleted.json() == {"id": conv["id"], "object": "conversation", "deleted": True}
    assert_error(client.get(f"{BASE}/{conv['id']}"), 404, "1214", "conversation_id")
    assert_error(client.delete(f"{BASE}/{conv['id']}"), 404, "1214")


def test_listing_pages_newest_first_and_searches(client: TestClient):
    made = [create(client, title=f"chat {i}")["id"] for i in range(5)]
    append(client, made[0], user("Where do LLAMAS live?"))  # now the newest

    expected = [made[0], made[4], made[3], made[2], made[1]]
    seen, after = [], None
    while True:
        page = client.get(BASE, params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [c["id"] for c in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == expected

    assert [c["id"] for c in client.get(BASE, params={"q": "llamas"}).json()["data"]] == [made[0]]
    assert [c["id"] for c in client.get(BASE, params={"q": "CHAT 3"}).json()["data"]] == [made[3]]
    assert client.get(BASE, params={"q": "nothing like it"}).json()["data"] == []

    assert_error(client.get(BASE, params={"limit": 0}), 400, "1214", "limit")
    assert_error(client.get(BASE, params={"limit": 101}), 400, "1214", "limit")
    assert_error(client.get(BASE, params={"after": "conv_nope"}), 400, "1214", "after")
    assert_error(client.get(BASE, params={"q": "nul\x00"}), 400, "1214", "q")


def test_two_keys_never_see_each_others_conversations(make_client, store: Store, key: str):
    first = make_client()
    first.headers["Authorization"] = f"Bearer {key}"
    second = make_client()
    second.headers["Authorization"] = f"Bearer {store.keys.create('second')[1]}"
    anonymous = make_client()

    mine = create(first, title="private")
    append(first, mine["id"], user("secret plans"))

    for path in (f"{BASE}/{mine['id']}", f"{BASE}/{mine['id']}/export"):
        assert_error(second.get(path), 404, "1214", "conversation_id")
    assert_error(second.patch(f"{BASE}/{mine['id']}", json={"title": "taken"}), 404, "1214")
    assert_error(append(second, mine["id"], user("hi")), 404, "1214")
    assert_error(second.delete(f"{BASE}/{mine['id']}"), 404, "1214")
    assert second.get(BASE, params={"q": "secret"}).json()["data"] == []
    assert_error(second.get(BASE, params={"after": mine["id"]}), 400, "1214", "after")

    # keys exist, so a request without one is refused before anything is read
    assert_error(anonymous.get(BASE), 401, "1001")
    assert_error(anonymous.post(BASE, json={}), 401, "1001")

    still = first.get(f"{BASE}/{mine['id']}").json()
    assert still["title"] == "private" and [m["content"] for m in still["messages"]] == ["secret plans"]


def test_open_mode_needs_no_key_and_shares_the_keyless_conversations(make_client, store: Store):
    client = make_client()  # no keys in the store, loopback host: open mode
    conv = create(client, title="open", system_prompt="You are terse.")
    assert client.get(BASE).json()["data"][0]["id"] == conv["id"]
    found = store.conversations.find_by_title(None, "open")  # what `glmstack conversations` sees
    assert found is not None and found.id == conv["id"] and found.system_prompt == "You are terse."


def test_exports(client: TestClient):
    conv = create(client, title="Trip: 巴黎/Paris?", system_prompt="Plan trips.")
    tool_calls = [{"id": "call_1", "type": "function",
                   "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]
    append(client, conv["id"], user("Weather?"),
           {"role": "assistant", "content": "", "reasoning_content": "Check it.\nThen answer.",
            "tool_calls": tool_calls},
           {"role": "tool", "content": "{\"sunny\": true}"},
           {"role": "assistant", "content": "Sunny."})

    as_json = client.get(f"{BASE}/{conv['id']}/export")
    assert as_json.status_code == 200
    assert as_json.headers["content-type"].startswith("application/json")
    disposition = as_json.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="Trip_ _Paris.json"'), disposition
    assert "filename*=UTF-8''Trip%3A%20%E5%B7%B4%E9%BB%8E%2FParis%3F.json" in disposition
    assert json.loads(as_json.text) == client.get(f"{BASE}/{conv['id']}").json()

    markdown = client.get(f"{BASE}/{conv['id']}/export", params={"format": "markdown"})
    assert markdown.headers["content-type"] == "text/markdown; charset=utf-8"
    assert markdown.headers["content-disposition"].startswith('attachment; filename="Trip_ _Paris.md"')
    text = markdown.text
    assert text.startswith("# Trip: 巴黎/Paris?\n\n## System\n\nPlan trips.\n\n## User\n\nWeather?\n\n## Assistant\n\n"
                           "> Check it.\n> Then answer.\n\n```json\n")
    assert '"name": "weather"' in text and "## Tool\n\n{\"sunny\": true}" in text
    assert text.endswith("## Assistant\n\nSunny.\n")

    assert_error(client.get(f"{BASE}/{conv['id']}/export", params={"format": "pdf"}), 400, "1214", "format")


@pytest.mark.parametrize(("body", "field"), [
    ({"title": ""}, "title"),
    ({"title": "x" * 201}, "title"),
    ({"title": "nul\u0000"}, "title"),
    ({"settings": {"blob": "x" * (64 * 1024)}}, "settings"),
    ({"settings": [1, 2]}, "settings"),
])
def test_bad_conversation_fields_are_refused_by_name(client: TestClient, body: dict[str, Any], field: str):
    assert_error(client.post(BASE, json=body), 400, "1214", field)
    assert client.get(BASE).json()["data"] == []


def test_bad_updates_are_refused_by_name(client: TestClient):
    conv = create(client, title="keep me")
    url = f"{BASE}/{conv['id']}"
    assert_error(client.patch(url, json={"title": None}), 400, "1214", "title")
    assert_error(client.patch(url, json={"title": ""}), 400, "1214", "title")
    assert_error(client.patch(url, json={"settings": "warm"}), 400, "1214", "settings")
    nan = client.patch(url, content=b'{"settings": {"temperature": NaN}}', headers={"Content-Type": "application/json"})
    assert_error(nan, 400, "1214", "settings")
    assert_error(client.patch(f"{BASE}/conv_missing", json={"title": "x"}), 404, "1214", "conversation_id")
    assert client.get(url).json()["title"] == "keep me"


def test_bad_messages_are_refused_by_name_and_change_nothing(client: TestClient):
    conv = create(client)
    append(client, conv["id"], user("kept"))
    url = f"{BASE}/{conv['id']}/messages"
    cases = [
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [user("x" * 1_000_001)]}, "messages[0].content"),
        ({"messages": [user("ok"), user("\u0000")]}, "messages[1].content"),
        ({"messages": [{**user("x"), "meta": {"a": "x" * (64 * 1024)}}]}, "messages[0].meta"),
        ({"messages": [user("x")] * 101}, "messages"),
        ({"messages": [user("x")], "replace_from": -1}, "replace_from"),
    ]
    for body, field in cases:
        response = client.post(url, json=body)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["code"] in ("1213", "1214") and field in error["message"], (field, error)
    assert_error(client.post(f"{BASE}/conv_{'0' * 24}/messages", json={"messages": []}), 404, "1214")
    assert [m["content"] for m in client.get(f"{BASE}/{conv['id']}").json()["messages"]] == ["kept"]


def test_a_full_conversation_refuses_more(client: TestClient, store: Store, key: str):
    conv = create(client)
    # filled through the store: 100 calls of 100 over HTTP would only make the test slow
    key_id = key.split(".")[0]
    store.conversations.append_messages(key_id, conv["id"],
                                        [NewMessage(role="user", content=str(i)) for i in range(MAX_MESSAGES)])
    assert_error(append(client, conv["id"], user("one more")), 400, "1214", "messages")
    replaced = append(client, conv["id"], user("instead"), replace_from=MAX_MESSAGES - 1)
    assert replaced.status_code == 200 and replaced.json()["message_count"] == MAX_MESSAGES

