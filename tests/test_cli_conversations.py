"""`glmstack conversations ...` and `glmstack chat --conversation NAME`, run as the command runs (main() with
its arguments, on the database GLMSTACK_* points at). The chat tests use the bundled model with a few tokens."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmstack.cli.main import main
from glmstack.store import Store
from glmstack.store.conversations import NewMessage


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A GLMSTACK_HOME of this test's own, and no other GLMSTACK_* setting from the environment."""
    import os

    for name in [n for n in os.environ if n.startswith("GLMSTACK_") and not n.startswith("GLMSTACK_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GLMSTACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def store(home: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.setenv("GLMSTACK_DATABASE_URL", database_url)
    with Store(database_url, home=home) as s:
        yield s


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_export_rename_delete(store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path):
    trip = store.conversations.create(None, title="Trip to Paris", system_prompt="Plan trips.")
    store.conversations.append_messages(None, trip.id, [NewMessage("user", "Weather in June?"),
                                                        NewMessage("assistant", "Mild and sunny.")])
    store.conversations.create(None, title="Groceries")
    keyed = store.conversations.create("key-1", title="Key's own")

    code, out, _ = run(capsys, "conversations", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "UPDATED", "(UTC)", "MESSAGES", "TITLE"]
    assert [line.split()[0] for line in lines[1:]] == [  # newest updated first; another key's not shown
        store.conversations.find_by_title(None, "Groceries").id, trip.id]  # type: ignore[union-attr]
    assert lines[2].split()[3:] == ["2", "Trip", "to", "Paris"]

    assert run(capsys, "conversations", "list", "--search", "SUNNY")[1].count("\n") == 2  # header + trip
    code, out, _ = run(capsys, "conversations", "list", "--key", "key-1")
    assert keyed.id in out and trip.id not in out
    code, out, _ = run(capsys, "conversations", "list", "--all")
    assert code == 0 and "KEY" in out.splitlines()[0] and "key-1" in out and "(no key)" in out

    code, out, _ = run(capsys, "conversations", "show", "Trip to Paris")
    assert code == 0 and out.startswith("# Trip to Paris\n\n## System\n\nPlan trips.\n\n## User\n\nWeather in June?")

    code, out, _ = run(capsys, "conversations", "export", trip.id)
    exported = json.loads(out)
    assert code == 0 and exported["id"] == trip.id and [m["content"] for m in exported["messages"]] == [
        "Weather in June?", "Mild and sunny."]
    target = tmp_path / "trip.md"
    code, out, _ = run(capsys, "conversations", "export", "Trip to Paris", "--format", "markdown", "-o", str(target))
    assert code == 0 and out == "" and target.read_text(encoding="utf-8").endswith("## Assistant\n\nMild and sunny.\n")

    assert run(capsys, "conversations", "rename", "Trip to Paris", "Paris, June")[0] == 0
    renamed = store.conversations.get(None, trip.id)
    assert renamed is not None and renamed.title == "Paris, June"

    assert run(capsys, "conversations", "delete", "Key's own", "--key", "key-1")[0] == 0
    assert store.conversations.get("key-1", keyed.id) is None


def test_an_unknown_or_other_owners_name_is_a_one_line_error(store: Store, capsys: pytest.CaptureFixture[str]):
    store.conversations.create("key-1", title="hidden")
    for args in (["show", "nowhere"], ["delete", "hidden"], ["rename", "hidden", "x"], ["export", "conv_0"]):
        code, out, err = run(capsys, "conversations", *args)
        assert code == 2 and out == ""
        assert err.startswith("glmstack: error: no conversation") and err.count("\n") == 1, err
    assert store.conversations.find_by_title("key-1", "hidden") is not None


@pytest.mark.slow
def test_chat_continues_and_saves_a_conversation(home: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch):
    chat = ["chat", "--temperature", "0", "--max-tokens", "4", "--conversation", "Names"]
    assert run(capsys, *chat, "--system", "Answer briefly.", "-p", "My name is Ada.")[0] == 0
    # the interactive chat continues it (input() reads the piped lines; the chat thinks it has a terminal)
    stdin = io.StringIO("What is my name?\nstop\n")
    stdin.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr("sys.stdin", stdin)
    assert run(capsys, *chat)[0] == 0

    with Store(f"sqlite:///{home / 'glmstack.db'}", home=home) as store:  # the default database
        saved = store.conversations.find_by_title(None, "Names")
        assert saved is not None and saved.system_prompt == "Answer briefly." and saved.model
        assert [(m.role, m.content) for m in saved.messages][0::2] == [
            ("user", "My name is Ada."), ("user", "What is my name?")]
        assert [m.role for m in saved.messages][1::2] == ["assistant", "assistant"]
        first, second = saved.messages[1].meta, saved.messages[3].meta
        assert first is not None and second is not None
        assert first["model"] == saved.model and first["finish_reason"] in ("stop", "length")
        # the second turn's prompt held the first turn: the saved history was loaded
        usage1, usage2 = first["usage"], second["usage"]
        assert usage2["prompt_tokens"] > usage1["prompt_tokens"] + usage1["completion_tokens"]


def test_chat_log_creates_on_the_first_turn_and_clear_empties_it(store: Store):
    from glmstack.cli.conversations import ChatLog
    from glmstack.protocol import GenerationEvent, Usage

    log = ChatLog(store, None, "Later", system="Be kind.")
    assert log.history() == [] and store.conversations.find_by_title(None, "Later") is None  # nothing yet
    log.record("hi", "hello", GenerationEvent("", [], "stop", Usage(3, 2)), "tiny")
    saved = store.conversations.find_by_title(None, "Later")
    assert saved is not None and saved.system_prompt == "Be kind." and saved.model == "tiny"
    assert saved.messages[1].meta == {"model": "tiny", "finish_reason": "stop",
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    again = ChatLog(store, None, saved.id, system=None)  # by id; the saved system prompt
    assert again.system_prompt == "Be kind."
    assert again.history() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    again.clear()
    assert store.conversations.get(None, saved.id).message_count == 0  # type: ignore[union-attr]
