"""Conversations and their messages: what the web chat page and `glmstack chat --conversation` keep.

Ids are "conv_" and 24 random hex digits. Every method takes the owner (`key_id`; None is the keyless open
mode, which the terminal uses too), and another owner's conversation is reported exactly like a missing one.
Messages have consecutive positions 0, 1, 2, ... within their conversation; `append_messages` keeps them so,
replacing a tail (a regenerated or edited turn) and appending in one transaction. JSON columns (settings,
tool_calls, meta) hold JSON text: both databases store it the same way, and the API hands it back as parsed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Row, Select, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store.db import Database
from glmstack.store.errors import StoreError
from glmstack.store.ids import plausible_id
from glmstack.store.tables import conversation_messages as messages_table
from glmstack.store.tables import conversations

ID_PREFIX = "conv_"
MAX_ID_LENGTH = 40  # tables.conversations.id
UPDATABLE = frozenset({"title", "model", "system_prompt", "settings"})


class TooManyMessagesError(StoreError):
    """An append would take a conversation past the most messages it may hold."""

    def __init__(self, most: int) -> None:
        super().__init__(f"a conversation holds at most {most} messages")
        self.most = most


@dataclass(frozen=True)
class NewMessage:
    role: str  # user | assistant | tool | system
    content: str
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class Message:
    position: int
    role: str
    content: str
    reasoning_content: str | None
    tool_calls: list[Any] | None
    meta: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class Conversation:
    id: str
    key_id: str | None
    title: str
    model: str | None
    system_prompt: str | None
    settings: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    message_count: int
    messages: tuple[Message, ...] = field(default=())  # filled by get() and the writes, not by list()


def new_conversation_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # SQLite returns naive UTC


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _owned_by(key_id: str | None) -> ColumnElement[bool]:
    return conversations.c.key_id.is_(None) if key_id is None else conversations.c.key_id == key_id


def _summaries() -> Select[Any]:
    """Conversations with their message counts (no messages). A correlated count, on the (conversation_id,
    position) index, so a page costs its own rows rather than a scan of every conversation's messages."""
    count = (select(func.count()).select_from(messages_table)
             .where(messages_table.c.conversation_id == conversations.c.id).scalar_subquery())
    return select(conversations, count.label("message_count"))


def _matching(q: str) -> ColumnElement[bool]:
    """Case-insensitive substring over the title and every message's content. `lower()` on both sides:
    PostgreSQL's folds all of Unicode, SQLite's only ASCII (letters without case, like CJK, need none).
    autoescape: a `%` or `_` in the query is a literal character, not a wildcard."""
    needle = q.lower()
    in_messages = exists().where(messages_table.c.conversation_id == conversations.c.id,
                                 func.lower(messages_table.c.content).contains(needle, autoescape=True))
    return or_(func.lower(conversations.c.title).contains(needle, autoescape=True), in_messages)


def _conversation(row: Row, messages: Sequence[Message] = ()) -> Conversation:
    m = row._mapping
    return Conversation(id=m["id"], key_id=m["key_id"], title=m["title"], model=m["model"],
                        system_prompt=m["system_prompt"], settings=_loads(m["settings"]),
                        created_at=_utc(m["created_at"]), updated_at=_utc(m["updated_at"]),
                        message_count=int(m["message_count"]), messages=tuple(messages))


def _message(row: Row) -> Message:
    return Message(position=row.position, role=row.role, content=row.content,
                   reasoning_content=row.reasoning_content, tool_calls=_loads(row.tool_calls),
                   meta=_loads(row.meta), created_at=_utc(row.created_at))


class ConversationStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- reads --------------------------------------------------------------------------------------

    def get(self, key_id: str | None, conversation_id: str) -> Conversation | None:
        """The conversation with its messages in position order; None: missing, or another owner's."""
        if not plausible_id(conversation_id):
            return None
        with self._db.read() as conn:
            return self._get(conn, key_id, conversation_id)

    def _get(self, conn: Connection, key_id: str | None, conversation_id: str) -> Conversation | None:
        row = conn.execute(_summaries().where(conversations.c.id == conversation_id, _owned_by(key_id))).first()
        if row is None:
            return None
        rows = conn.execute(select(messages_table)
                            .where(messages_table.c.conversation_id == conversation_id)
                            .order_by(messages_table.c.position)).all()
        return _conversation(row, [_message(r) for r in rows])

    def list_all_owners(self, *, q: str | None = None, limit: int = 1000) -> list[Conversation]:
        """Every owner's conversations, most recently updated first (`glmstack conversations list --all`)."""
        return self._list(None, q=q, after=None, limit=limit)[0]

    # (`list` comes after the methods that annotate with the builtin `list`, which it would shadow.)
    def _list(self, owner: ColumnElement[bool] | None, *, q: str | None, after: Conversation | None,
              limit: int) -> tuple[list[Conversation], bool]:
        query = _summaries()
        if owner is not None:
            query = query.where(owner)
        if q:
            query = query.where(_matching(q))
        # (updated_at, id) orders ties within the same microsecond too, so a cursor never skips or repeats.
        if after is not None:
            at, after_id = after.updated_at, after.id
            query = query.where(or_(conversations.c.updated_at < at,
                                    and_(conversations.c.updated_at == at, conversations.c.id < after_id)))
        query = query.order_by(conversations.c.updated_at.desc(), conversations.c.id.desc()).limit(limit + 1)
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [_conversation(row) for row in rows[:limit]], len(rows) > limit

    def list(self, key_id: str | None, *, q: str | None = None, after: Conversation | None = None,
             limit: int = 50) -> tuple[list[Conversation], bool]:
        """One page of the owner's conversations (without messages), most recently updated first: those
        after the conversation `after` in that order. Returns the page and whether more follow."""
        return self._list(_owned_by(key_id), q=q, after=after, limit=limit)

    def find_by_title(self, key_id: str | None, title: str) -> Conversation | None:
        """The owner's most recently updated conversation titled exactly `title`, with its messages."""
        with self._db.read() as conn:
            found = conn.execute(select(conversations.c.id)
                                 .where(conversations.c.title == title, _owned_by(key_id))
                                 .order_by(conversations.c.updated_at.desc(), conversations.c.id.desc())
                                 .limit(1)).scalar()
            return self._get(conn, key_id, found) if found is not None else None

    # ---- writes -------------------------------------------------------------------------------------

    def create(self, key_id: str | None, *, title: str, model: str | None = None,
               system_prompt: str | None = None, settings: Mapping[str, Any] | None = None) -> Conversation:
        now = datetime.now(UTC)
        conversation = Conversation(id=new_conversation_id(), key_id=key_id, title=title, model=model,
                                    system_prompt=system_prompt,
                                    settings=dict(settings) if settings is not None else None,
                                    created_at=now, updated_at=now, message_count=0)
        with self._db.write() as conn:
            conn.execute(insert(conversations).values(
                id=conversation.id, key_id=key_id, title=title, model=model, system_prompt=system_prompt,
                settings=_dumps(conversation.settings), created_at=now, updated_at=now))
        return conversation

    def update(self, key_id: str | None, conversation_id: str, changes: Mapping[str, Any]) -> Conversation | None:
        """Sets the given fields (of title, model, system_prompt, settings; None clears all but the title)
        and bumps updated_at. Returns the conversation with its messages; None: missing."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
        values = {name: _dumps(value) if name == "settings" else value for name, value in changes.items()}
        if not plausible_id(conversation_id):
            return None
        with self._db.write() as conn:
            done = conn.execute(update(conversations)
                                .where(conversations.c.id == conversation_id, _owned_by(key_id))
                                .values(**values, updated_at=datetime.now(UTC)))
            return self._get(conn, key_id, conversation_id) if done.rowcount else None

    def delete(self, key_id: str | None, conversation_id: str) -> bool:
        """Deletes the conversation and its messages; False: there was none."""
        if not plausible_id(conversation_id):
            return False
        with self._db.write() as conn:
            owned = conn.execute(select(conversations.c.id)
                                 .where(conversations.c.id == conversation_id, _owned_by(key_id))).first()
            if owned is None:
                return False
            # Explicit rather than ON DELETE CASCADE alone: SQLite enforces it only with foreign_keys on.
            conn.execute(delete(messages_table).where(messages_table.c.conversation_id == conversation_id))
            conn.execute(delete(conversations).where(conversations.c.id == conversation_id))
        return True

    def append_messages(self, key_id: str | None, conversation_id: str, messages: Sequence[NewMessage], *,
                        replace_from: int | None = None, max_messages: int | None = None) -> Conversation | None:
        """In one transaction: removes the messages at positions >= `replace_from` (if given), appends
        `messages` at the next positions, and bumps updated_at. Raises TooManyMessagesError (and changes
        nothing) if the conversation would then hold more than `max_messages`. Returns the conversation
        with its messages; None: missing."""
        if not plausible_id(conversation_id):
            return None
        now = datetime.now(UTC)
        with self._db.write() as conn:
            # FOR UPDATE: two appends to one conversation on PostgreSQL wait for each other here, instead of
            # both taking the same next position (SQLite's BEGIN IMMEDIATE serializes them already).
            owned = conn.execute(select(conversations.c.id)
                                 .where(conversations.c.id == conversation_id, _owned_by(key_id))
                                 .with_for_update()).first()
            if owned is None:
                return None
            of_this = messages_table.c.conversation_id == conversation_id
            if replace_from is not None:
                conn.execute(delete(messages_table).where(of_this, messages_table.c.position >= replace_from))
            # Positions are 0..n-1, so the count is the next one.
            start = conn.execute(select(func.count()).select_from(messages_table).where(of_this)).scalar_one()
            if max_messages is not None and start + len(messages) > max_messages:
                raise TooManyMessagesError(max_messages)  # rolls the deletion back with it
            if messages:
                conn.execute(insert(messages_table), [
                    {"conversation_id": conversation_id, "position": start + i, "role": m.role,
                     "content": m.content, "reasoning_content": m.reasoning_content,
                     "tool_calls": _dumps(m.tool_calls), "meta": _dumps(m.meta), "created_at": now}
                    for i, m in enumerate(messages)])
            conn.execute(update(conversations).where(conversations.c.id == conversation_id).values(updated_at=now))
            return self._get(conn, key_id, conversation_id)
