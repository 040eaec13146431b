"""ConversationStore on a real database, SQLite and PostgreSQL (the `database_url` fixture): owners never see
each other's conversations, search and paging, and appends that replace a tail in one transaction."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmstack.store import Store
from glmstack.store.conversations import ID_PREFIX, NewMessage, TooManyMessagesError


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    with Store(database_url, home=tmp_path) as s:
        yield s


def user(text: str) -> NewMessage:
    return NewMessage(role="user", content=text)


def assistant(text: str, **extra: object) -> NewMessage:
    return NewMessage(role="assistant", content=text, **extra)  # type: ignore[arg-type]


def test_create_get_and_json_columns_round_trip(store: Store):
    conversations = store.conversations
    created = conversations.create(None, title="旅行计划", model="glm-4", system_prompt="Be brief.",
                                   settings={"temperature": 0.3, "knowledge_id": "123"})
    assert created.id.startswith(ID_PREFIX) and len(created.id) == len(ID_PREFIX) + 24
    tool_calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
    conversations.append_messages(None, created.id, [
        user("去哪里？"),
        assistant("", reasoning_content="想一想", tool_calls=tool_calls, meta={"usage": {"total_tokens": 9}}),
    ])

    got = conversations.get(None, created.id)
    assert got is not None
    assert (got.title, got.model, got.system_prompt) == ("旅行计划", "glm-4", "Be brief.")
    assert got.settings == {"temperature": 0.3, "knowledge_id": "123"}
    assert got.message_count == 2
    assert [(m.position, m.role, m.content) for m in got.messages] == [(0, "user", "去哪里？"), (1, "assistant", "")]
    reply = got.messages[1]
    assert reply.reasoning_content == "想一想" and reply.tool_calls == tool_calls
    assert reply.meta == {"usage": {"total_tokens": 9}}
    assert got.updated_at >= got.created_at and got.created_at.tzinfo is not None


def test_another_owner_sees_nothing(store: Store):
    conversations = store.conversations
    mine = conversations.create("key-a", title="mine")
    open_mode = conversations.create(None, title="open")

    for owner in ("key-b", None):
        assert conversations.get(owner, mine.id) is None
        assert conversations.update(owner, mine.id, {"title": "taken"}) is None
        assert conversations.append_messages(owner, mine.id, [user("hi")]) is None
        assert conversations.delete(owner, mine.id) is False
        assert conversations.find_by_title(owner, "mine") is None
    assert [c.id for c in conversations.list("key-b")[0]] == []
    assert [c.id for c in conversations.list(None)[0]] == [open_mode.id]
    assert conversations.get("key-a", open_mode.id) is None

    still = conversations.get("key-a", mine.id)
    assert still is not None and still.title == "mine" and still.message_count == 0
    assert {c.id for c in conversations.list_all_owners()} == {mine.id, open_mode.id}


def test_unlikely_ids_are_simply_missing(store: Store):
    for bad in ("", "conv_\x00", "x" * 500, "conv_é"):
        assert store.conversations.get(None, bad) is None
        assert store.conversations.delete(None, bad) is False


def test_list_is_newest_updated_first_and_pages_with_a_cursor(store: Store):
    conversations = store.conversations
    made = [conversations.create(None, title=f"chat {i}") for i in range(5)]
    conversations.append_messages(None, made[1].id, [user("bump")])  # now the most recently updated

    expected = [made[1].id, made[4].id, made[3].id, made[2].id, made[0].id]
    everything, more = conversations.list(None, limit=10)
    assert [c.id for c in everything] == expected and more is False
    assert everything[0].message_count == 1 and everything[1].message_count == 0

    seen, after = [], None
    while True:
        page, more = conversations.list(None, after=after, limit=2)
        seen += [c.id for c in page]
        if not more:
            break
        after = page[-1]
    assert seen == expected


def test_search_is_a_case_insensitive_substring_of_title_or_content(store: Store):
    conversations = store.conversations
    by_title = conversations.create(None, title="Rust LIFETIMES")
    by_content = conversations.create(None, title="other")
    conversations.append_messages(None, by_content.id, [user("explain lifetimes please"), assistant("好的")])
    chinese = conversations.create(None, title="问答")
    conversations.append_messages(None, chinese.id, [user("年假怎么算？")])
    wildcard = conversations.create(None, title="100% sure")
    conversations.create("someone-else", title="lifetimes too")

    def found(q: str) -> set[str]:
        return {c.id for c in conversations.list(None, q=q)[0]}

    assert found("LifeTimes") == {by_title.id, by_content.id}
    assert found("年假") == {chinese.id}
    assert found("好的") == {by_content.id}
    assert found("%") == {wildcard.id}  # a literal percent sign, not a wildcard
    assert found("_") == set()
    assert found("nowhere") == set()


def test_append_replaces_a_tail_in_one_transaction(store: Store):
    conversations = store.conversations
    conv = conversations.create(None, title="regenerate")
    conversations.append_messages(None, conv.id, [user("q1"), assistant("a1"), user("q2"), assistant("a2")])

    # regenerate the last reply
    after = conversations.append_messages(None, conv.id, [assistant("a2, again")], replace_from=3)
    assert after is not None
    assert [(m.position, m.content) for m in after.messages] == [
        (0, "q1"), (1, "a1"), (2, "q2"), (3, "a2, again")]

    # edit the first question: everything after it goes
    after = conversations.append_messages(None, conv.id, [user("q1 edited"), assistant("new")], replace_from=0)
    assert after is not None and [m.content for m in after.messages] == ["q1 edited", "new"]

    # a replace_from past the end removes nothing and the positions stay consecutive
    after = conversations.append_messages(None, conv.id, [user("q3")], replace_from=50)
    assert after is not None and [m.position for m in after.messages] == [0, 1, 2]

    # truncating alone
    after = conversations.append_messages(None, conv.id, [], replace_from=1)
    assert after is not None and [m.content for m in after.messages] == ["q1 edited"]


def test_a_full_conversation_refuses_the_append_and_keeps_its_messages(store: Store):
    conversations = store.conversations
    conv = conversations.create(None, title="full")
    conversations.append_messages(None, conv.id, [user("1"), assistant("2"), user("3")], max_messages=3)
    with pytest.raises(TooManyMessagesError):
        conversations.append_messages(None, conv.id, [assistant("4")], max_messages=3)
    with pytest.raises(TooManyMessagesError):  # the deletion is rolled back with the refused insert
        conversations.append_messages(None, conv.id, [user("x")] * 4, replace_from=0, max_messages=3)
    kept = conversations.get(None, conv.id)
    assert kept is not None and [m.content for m in kept.messages] == ["1", "2", "3"]
    replaced = conversations.append_messages(None, conv.id, [user("a"), assistant("b")], replace_from=1,
                                             max_messages=3)
    assert replaced is not None and [m.content for m in replaced.messages] == ["1", "a", "b"]


def test_concurrent_appends_get_distinct_positions(store: Store):
    conv = store.conversations.create(None, title="busy")
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            for j in range(5):
                store.conversations.append_messages(None, conv.id, [user(f"{i}-{j}")])
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = store.conversations.get(None, conv.id)
    assert got is not None and [m.position for m in got.messages] == list(range(20))
    assert sorted(m.content for m in got.messages) == sorted(f"{i}-{j}" for i in range(4) for j in range(5))


def test_update_sets_given_fields_and_clears_nulls(store: Store):
    conversations = store.conversations
    conv = conversations.create("k", title="t", model="glm-4", system_prompt="s", settings={"top_p": 0.5})
    updated = conversations.update("k", conv.id, {"title": "renamed", "settings": None})
    assert updated is not None
    assert (updated.title, updated.model, updated.system_prompt, updated.settings) == ("renamed", "glm-4", "s", None)
    assert updated.updated_at >= conv.updated_at
    with pytest.raises(ValueError):
        conversations.update("k", conv.id, {"key_id": "someone"})


def test_find_by_title_takes_the_most_recently_updated(store: Store):
    conversations = store.conversations
    older = conversations.create(None, title="notes")
    newer = conversations.create(None, title="notes")
    conversations.append_messages(None, older.id, [user("touched")])
    found = conversations.find_by_title(None, "notes")
    assert found is not None and found.id == older.id and [m.content for m in found.messages] == ["touched"]
    assert conversations.find_by_title(None, "Notes") is None  # exact
    assert newer.id != older.id


def test_delete_removes_the_messages_too(store: Store):
    conversations = store.conversations
    conv = conversations.create(None, title="gone")
    conversations.append_messages(None, conv.id, [user("a"), assistant("b")])
    assert conversations.delete(None, conv.id) is True
    assert conversations.get(None, conv.id) is None
    assert conversations.delete(None, conv.id) is False
    # no orphaned message is left to match a search
    assert conversations.list(None, q="b")[0] == []
