"""The conversations API's work: the store's rows as the documented objects, and the two export formats
(which `glmstack conversations export` prints too). Store calls run in a worker thread: they block."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.conversations import (
    MAX_MESSAGES,
    ConversationCreate,
    ConversationDeleted,
    ConversationList,
    ConversationObject,
    ConversationSummary,
    ConversationUpdate,
    MessageOut,
    MessagesAppend,
    storable_text,
)
from glmstack.store.conversations import Conversation, NewMessage, TooManyMessagesError

EXPORT_FORMATS = ("json", "markdown")
ROLE_HEADINGS = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


def not_found(conversation_id: str) -> PlatformError:
    return PlatformError(1214, f"no conversation {conversation_id!r}", http_status=404, field="conversation_id")


def _seconds(conversation: Conversation) -> dict[str, Any]:
    return {"id": conversation.id, "title": conversation.title, "model": conversation.model,
            "created_at": int(conversation.created_at.timestamp()),
            "updated_at": int(conversation.updated_at.timestamp()), "message_count": conversation.message_count}


def summary(conversation: Conversation) -> ConversationSummary:
    return ConversationSummary(**_seconds(conversation))


def conversation_object(conversation: Conversation) -> ConversationObject:
    messages = [MessageOut(position=m.position, role=m.role, content=m.content,  # type: ignore[arg-type]
                           reasoning_content=m.reasoning_content, tool_calls=m.tool_calls, meta=m.meta,
                           created_at=int(m.created_at.timestamp())) for m in conversation.messages]
    return ConversationObject(**_seconds(conversation), system_prompt=conversation.system_prompt,
                              settings=conversation.settings, messages=messages)


# ---- the routes' work -----------------------------------------------------------------------------------


async def list_conversations(platform: Platform, caller: Caller, *, q: str | None, limit: int,
                             after: str | None) -> ConversationList:
    store = platform.store.conversations
    if q is not None:
        _check_text(q, "q")
    cursor = None
    if after is not None:
        cursor = await run_in_threadpool(store.get, caller.key_id, after)
        if cursor is None:
            raise PlatformError(1214, f"no conversation {after!r} to list after", field="after")
    page, has_more = await run_in_threadpool(lambda: store.list(caller.key_id, q=q or None, after=cursor,
                                                                limit=limit))
    return ConversationList(data=[summary(c) for c in page], has_more=has_more)


async def create(platform: Platform, caller: Caller, body: ConversationCreate) -> ConversationObject:
    created = await run_in_threadpool(lambda: platform.store.conversations.create(
        caller.key_id, title=body.title, model=body.model, system_prompt=body.system_prompt,
        settings=body.settings))
    return conversation_object(created)


async def get(platform: Platform, caller: Caller, conversation_id: str) -> ConversationObject:
    return conversation_object(await _get(platform, caller, conversation_id))


async def update(platform: Platform, caller: Caller, conversation_id: str,
                 body: ConversationUpdate) -> ConversationObject:
    changes = {name: getattr(body, name) for name in body.model_fields_set}
    if "title" in changes and changes["title"] is None:
        raise PlatformError(1214, "title cannot be null", field="title")
    updated = await run_in_threadpool(platform.store.conversations.update, caller.key_id, conversation_id,
                                      changes)
    if updated is None:
        raise not_found(conversation_id)
    return conversation_object(updated)


async def delete(platform: Platform, caller: Caller, conversation_id: str) -> ConversationDeleted:
    if not await run_in_threadpool(platform.store.conversations.delete, caller.key_id, conversation_id):
        raise not_found(conversation_id)
    return ConversationDeleted(id=conversation_id)


async def append_messages(platform: Platform, caller: Caller, conversation_id: str,
                          body: MessagesAppend) -> ConversationObject:
    new = [NewMessage(role=m.role, content=m.content, reasoning_content=m.reasoning_content,
                      tool_calls=m.tool_calls, meta=m.meta) for m in body.messages]
    try:
        appended = await run_in_threadpool(lambda: platform.store.conversations.append_messages(
            caller.key_id, conversation_id, new, replace_from=body.replace_from, max_messages=MAX_MESSAGES))
    except TooManyMessagesError as e:
        raise PlatformError(1214, str(e), field="messages") from None
    if appended is None:
        raise not_found(conversation_id)
    return conversation_object(appended)


async def export(platform: Platform, caller: Caller, conversation_id: str, fmt: str) -> Response:
    conversation = await _get(platform, caller, conversation_id)
    body, media_type, suffix = exported(conversation, fmt)
    return Response(body, media_type=media_type,
                    headers={"Content-Disposition": content_disposition(conversation.title, suffix)})


async def _get(platform: Platform, caller: Caller, conversation_id: str) -> Conversation:
    found = await run_in_threadpool(platform.store.conversations.get, caller.key_id, conversation_id)
    if found is None:
        raise not_found(conversation_id)
    return found


def _check_text(value: str, field: str) -> None:
    try:
        storable_text(value)
    except ValueError as e:
        raise PlatformError(1214, f"{field}: {e}", field=field) from None


# ---- export ---------------------------------------------------------------------------------------------


def exported(conversation: Conversation, fmt: str) -> tuple[str, str, str]:
    """(body, media type, file suffix) of the conversation in `fmt` ("json" or "markdown")."""
    if fmt == "json":
        return (conversation_object(conversation).model_dump_json(indent=2) + "\n",
                "application/json", ".json")
    if fmt == "markdown":
        return to_markdown(conversation), "text/markdown; charset=utf-8", ".md"
    raise PlatformError(1214, f"format must be one of {', '.join(EXPORT_FORMATS)}", field="format")


def to_markdown(conversation: Conversation) -> str:
    """`# Title`, the system prompt, then a `## Role` section per message: its reasoning as a blockquote,
    its content, its tool calls as a JSON code block."""
    parts = [f"# {_one_line(conversation.title)}"]
    if conversation.system_prompt:
        parts.append(f"## System\n\n{conversation.system_prompt}")
    for message in conversation.messages:
        section = [f"## {ROLE_HEADINGS.get(message.role, message.role.title())}"]
        if message.reasoning_content:
            section.append("\n".join(f"> {line}".rstrip() for line in message.reasoning_content.splitlines()))
        if message.content:
            section.append(message.content)
        if message.tool_calls:
            section.append(_code_block(json.dumps(message.tool_calls, ensure_ascii=False, indent=2)))
        parts.append("\n\n".join(section))
    return "\n\n".join(parts) + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _code_block(text: str) -> str:
    # A fence longer than any run of backticks inside, so a JSON string holding ``` cannot end it early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}json\n{text}\n{fence}"


def content_disposition(title: str, suffix: str) -> str:
    """An attachment named after the title: `filename` in plain ASCII (header values are Latin-1 and
    some clients take only this one), `filename*` with the title as it is (RFC 6266) for those that can."""
    safe = re.sub(r"[^A-Za-z0-9._ -]+", "_", title).strip(" ._") or "conversation"
    full = quote(f"{title}{suffix}", safe="")
    return f"attachment; filename=\"{safe[:100]}{suffix}\"; filename*=UTF-8''{full}"
