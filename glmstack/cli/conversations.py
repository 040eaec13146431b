"""`glmstack conversations ...`: the conversations the web chat page keeps, from the terminal; and the
conversation `glmstack chat --conversation NAME` continues.

    glmstack conversations list [--search Q] [--key ID | --all]   id, last update, messages, title
    glmstack conversations show NAME_OR_ID                        the messages, readable
    glmstack conversations export NAME_OR_ID [--format json|markdown] [-o FILE]
    glmstack conversations rename NAME_OR_ID NEW_TITLE
    glmstack conversations delete NAME_OR_ID

NAME_OR_ID is a conversation's id or its exact title (the most recently updated one, if several share it).
Without --key they act on the keyless conversations: the open mode's, which the web page shows when the
server runs without keys. Like `glmstack keys`, they open the database of $GLMSTACK_DATABASE_URL (default:
SQLite in $GLMSTACK_HOME), so they work while a server runs on it; imports stay inside the functions so that
`glmstack chat` without --conversation does not load SQLAlchemy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmstack.cli.keys import print_table

if TYPE_CHECKING:
    from glmstack.settings import Settings
    from glmstack.store import Store
    from glmstack.store.conversations import Conversation

COMMANDS = ("conversations",)
EXIT_FAILURE, EXIT_USAGE = 1, 2
KEY_HELP = "the conversations of this API key (its id); default: the keyless ones (open mode)"


def add_subcommands(subparsers: Any) -> None:
    """Adds `conversations` to the `glmstack` parser's subparsers."""
    owner = argparse.ArgumentParser(add_help=False)
    owner.add_argument("--key", default=None, metavar="ID", help=KEY_HELP)
    parser = subparsers.add_parser("conversations", help="list, show, export, rename and delete conversations")
    sub = parser.add_subparsers(dest="conversations_command", required=True)

    listing = sub.add_parser("list", help="conversations, most recently updated first")
    listing.add_argument("--search", default=None, metavar="Q",
                         help="only those with this text in the title or a message (case-insensitive)")
    whose = listing.add_mutually_exclusive_group()
    whose.add_argument("--key", default=None, metavar="ID", help=KEY_HELP)
    whose.add_argument("--all", action="store_true", help="every owner's conversations")

    show = sub.add_parser("show", parents=[owner], help="print a conversation's messages")
    show.add_argument("name", metavar="NAME_OR_ID")
    export = sub.add_parser("export", parents=[owner], help="write a conversation as JSON or Markdown")
    export.add_argument("name", metavar="NAME_OR_ID")
    export.add_argument("--format", choices=("json", "markdown"), default="json")
    export.add_argument("-o", "--output", default=None, metavar="FILE", help="(default: stdout)")
    rename = sub.add_parser("rename", parents=[owner], help="give a conversation a new title")
    rename.add_argument("name", metavar="NAME_OR_ID")
    rename.add_argument("title", metavar="NEW_TITLE")
    delete = sub.add_parser("delete", parents=[owner], help="delete a conversation and its messages")
    delete.add_argument("name", metavar="NAME_OR_ID")


def add_chat_options(chat: argparse.ArgumentParser) -> None:
    """`glmstack chat --conversation NAME [--key ID]`."""
    chat.add_argument("--conversation", default=None, metavar="NAME",
                      help="continue this conversation (an id or exact title; created with this title if "
                           "missing) and save each turn to it, where the web page shows it too")
    chat.add_argument("--key", default=None, metavar="ID",
                      help="with --conversation: the API key (its id) that owns it; default: the keyless "
                           "conversations (open mode)")


def run(args: argparse.Namespace) -> int:
    from glmstack.settings import Settings
    from glmstack.store import Store, StoreError

    try:
        settings = Settings.from_env()
        with Store(settings.database_url, home=settings.home) as store:
            return _conversations(store, args)
    except (StoreError, ValueError, OSError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"glmstack: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(exc, StoreError) else EXIT_USAGE


def find(store: Store, key_id: str | None, name: str) -> Conversation | None:
    """By id first, then by exact title."""
    return store.conversations.get(key_id, name) or store.conversations.find_by_title(key_id, name)


def _found(store: Store, key_id: str | None, name: str) -> Conversation:
    conversation = find(store, key_id, name)
    if conversation is None:
        owner = f" of key {key_id}" if key_id else ""
        raise ValueError(f"no conversation{owner} with id or title {name!r} (see `glmstack conversations list`)")
    return conversation


def _conversations(store: Store, args: argparse.Namespace) -> int:
    command = args.conversations_command
    if command == "list":
        return _list(store, args)
    conversation = _found(store, args.key, args.name)
    if command == "show":
        from glmstack.api.services.conversations import to_markdown

        print(f"{conversation.id} · {conversation.model or 'no model'} · {conversation.message_count} messages · "
              f"updated {conversation.updated_at:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
        sys.stdout.write(to_markdown(conversation))
    elif command == "export":
        from glmstack.api.services.conversations import exported

        text = exported(conversation, args.format)[0]
        if args.output is None:
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text, encoding="utf-8")
            print(f"wrote {args.output}", file=sys.stderr)
    elif command == "rename":
        title = args.title.strip()
        if not 0 < len(title) <= 200 or "\x00" in title:
            raise ValueError("a title is 1 to 200 characters")
        store.conversations.update(args.key, conversation.id, {"title": title})
        print(f"renamed {conversation.id} to {title!r}", file=sys.stderr)
    elif command == "delete":
        store.conversations.delete(args.key, conversation.id)
        print(f"deleted {conversation.id} ({conversation.title!r})", file=sys.stderr)
    return 0


def _list(store: Store, args: argparse.Namespace) -> int:
    search = args.search or None
    if args.all:
        found = store.conversations.list_all_owners(q=search)
    else:
        found, _ = store.conversations.list(args.key, q=search, limit=1000)
    if not found:
        print("no conversations" + (f" matching {search!r}" if search else ""), file=sys.stderr)
        return 0
    headers = ["ID", "UPDATED (UTC)", "MESSAGES", "TITLE"]
    rows = [[c.id, f"{c.updated_at:%Y-%m-%d %H:%M}", str(c.message_count), c.title] for c in found]
    if args.all:
        headers.insert(1, "KEY")
        for row, c in zip(rows, found, strict=True):
            row.insert(1, c.key_id or "(no key)")
    print_table(headers, rows, numeric={headers.index("MESSAGES")})
    return 0


# ---- glmstack chat --conversation ------------------------------------------------------------------------


class ChatLog:
    """The conversation a `glmstack chat` session continues: its messages become the chat's history, and
    each finished turn is appended to it. A conversation that does not exist yet is created with the first
    turn, so a chat that never gets that far leaves nothing behind."""

    def __init__(self, store: Store, key_id: str | None, name: str, system: str | None) -> None:
        self._store, self._key_id, self._name = store, key_id, name
        self._conversation = find(store, key_id, name)
        self.system_prompt = system
        if self._conversation is not None:
            if system is None:
                self.system_prompt = self._conversation.system_prompt
            elif system != self._conversation.system_prompt:  # --system replaces the saved prompt
                store.conversations.update(key_id, self._conversation.id, {"system_prompt": system})

    def history(self) -> list[dict[str, Any]]:
        """The saved messages as chat messages (the system prompt is `system_prompt`)."""
        if self._conversation is None:
            return []
        history = []
        for message in self._conversation.messages:
            item: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                item["tool_calls"] = message.tool_calls
            history.append(item)
        return history

    def record(self, prompt: str, reply: str, last_event: Any, model_name: str) -> None:
        """Appends a finished turn: the user's prompt and the reply, with what produced it."""
        from glmstack.store.conversations import NewMessage

        conversations = self._store.conversations
        if self._conversation is None:
            self._conversation = conversations.create(self._key_id, title=self._name[:200], model=model_name,
                                                      system_prompt=self.system_prompt)
        meta: dict[str, Any] = {"model": model_name}
        if last_event is not None:
            usage = last_event.usage
            meta["usage"] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                             "total_tokens": usage.total_tokens}
            meta["finish_reason"] = last_event.finish_reason
        conversations.append_messages(self._key_id, self._conversation.id, [
            NewMessage(role="user", content=prompt),
            NewMessage(role="assistant", content=reply, meta=meta),
        ])

    def clear(self) -> None:
        """`clear` in the chat: the saved conversation starts over too."""
        if self._conversation is not None:
            self._store.conversations.append_messages(self._key_id, self._conversation.id, [], replace_from=0)


@contextmanager
def chat_log(settings: Settings, name: str | None, key_id: str | None, system: str | None) -> Iterator[ChatLog | None]:
    """The ChatLog of `glmstack chat --conversation NAME`; None (and no database opened) without one."""
    if name is None:
        yield None
        return
    from glmstack.store import Store

    with Store(settings.database_url, home=settings.home) as store:
        yield ChatLog(store, key_id, name, system)
