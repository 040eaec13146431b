"""Conversations under /api/glmstack: what the web chat page (and any other client) keeps on the server.
Times are Unix seconds. The caps are checked here, so a request over one is refused naming the field (1214)."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from glmstack.api.schemas.fields import JsonList, JsonObject, unicode_text

MAX_TITLE_CHARS = 200  # tables.conversations.title
MAX_CONTENT_CHARS = 1_000_000
MAX_JSON_BYTES = 64 * 1024  # settings, and each message's meta
MAX_MESSAGES_PER_CALL = 100
MAX_MESSAGES = 10_000  # in one conversation
DEFAULT_TITLE = "New chat"

Role = Literal["user", "assistant", "tool", "system"]


def storable_text(value: str) -> str:
    """Valid Unicode without NUL characters, which PostgreSQL's text columns cannot hold."""
    unicode_text(value)
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def small_json(value: Any) -> Any:
    """At most MAX_JSON_BYTES as UTF-8 JSON, and no NaN or Infinity (which JSON cannot spell)."""
    try:
        size = len(json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except ValueError:
        raise ValueError("numbers must be finite") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"at most {MAX_JSON_BYTES} bytes of JSON ({size} given)")
    return value


def finite_json(value: Any) -> Any:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite")
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return value


StoredText = Annotated[str, AfterValidator(storable_text)]
Title = Annotated[StoredText, Field(min_length=1, max_length=MAX_TITLE_CHARS)]
Content = Annotated[StoredText, Field(max_length=MAX_CONTENT_CHARS)]
SmallObject = Annotated[JsonObject, AfterValidator(small_json)]
ToolCalls = Annotated[JsonList, AfterValidator(finite_json)]


# ---- requests -------------------------------------------------------------------------------------------


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    title: Title = DEFAULT_TITLE
    model: Annotated[StoredText, Field(max_length=200)] | None = None
    system_prompt: Content | None = None
    settings: SmallObject | None = Field(None, description="Free-form: temperature, top_p, max_tokens, "
                                                           "knowledge_id, ... (at most 64 KB of JSON)")


class ConversationUpdate(BaseModel):
    """Only the fields present change; `null` clears model, system_prompt or settings."""

    model_config = ConfigDict(extra="ignore")

    title: Title | None = None
    model: Annotated[StoredText, Field(max_length=200)] | None = None
    system_prompt: Content | None = None
    settings: SmallObject | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: Content
    reasoning_content: Content | None = None
    tool_calls: ToolCalls | None = None
    meta: SmallObject | None = Field(None, description="Free-form: model, usage, finish_reason, ... "
                                                       "(at most 64 KB of JSON)")


class MessagesAppend(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[MessageIn] = Field(max_length=MAX_MESSAGES_PER_CALL)
    replace_from: int | None = Field(None, ge=0, description="Remove the messages at this position and after "
                                                             "first (regenerate, edit), in the same transaction")


# ---- answers --------------------------------------------------------------------------------------------


class ConversationSummary(BaseModel):
    id: str = Field(description='"conv_" and 24 hex digits')
    object: Literal["conversation"] = "conversation"
    title: str
    model: str | None
    created_at: int = Field(description="Unix seconds")
    updated_at: int = Field(description="Unix seconds")
    message_count: int


class MessageOut(BaseModel):
    position: int = Field(description="0, 1, 2, ... within the conversation")
    role: Role
    content: str
    reasoning_content: str | None
    tool_calls: list[Any] | None
    meta: dict[str, Any] | None
    created_at: int = Field(description="Unix seconds")


class ConversationObject(ConversationSummary):
    system_prompt: str | None
    settings: dict[str, Any] | None
    messages: list[MessageOut]


class ConversationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ConversationSummary]
    has_more: bool


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    deleted: bool = True
