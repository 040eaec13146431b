"""Conversations under /api/glmstack (a glmstack addition, not a platform API): list, create, read, update,
delete, append messages, export. Keyed like every route: a key sees only its own conversations, and with
auth off (open mode) everyone shares the keyless ones, which `glmstack conversations` shows as well."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.conversations import (
    ConversationCreate,
    ConversationDeleted,
    ConversationList,
    ConversationObject,
    ConversationUpdate,
    MessagesAppend,
)
from glmstack.api.schemas.errors import error_responses
from glmstack.api.services import conversations

router = keyed_router(tags=["conversations"])

MAX_LIST_LIMIT = 100


@router.get("/conversations", response_model=ConversationList, responses=error_responses(400, 401, 500))
async def list_conversations(
    caller: CallerDep,
    platform: PlatformDep,
    q: Annotated[str | None, Query(description="Case-insensitive text in the title or any message")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50,
    after: Annotated[str | None, Query(description="The last id of the previous page")] = None,
) -> Any:
    return await conversations.list_conversations(platform, caller, q=q, limit=limit, after=after)


@router.post("/conversations", response_model=ConversationObject, responses=error_responses(400, 401, 500))
async def create_conversation(body: ConversationCreate, caller: CallerDep, platform: PlatformDep) -> Any:
    return await conversations.create(platform, caller, body)


@router.get("/conversations/{conversation_id}", response_model=ConversationObject,
            responses=error_responses(401, 404, 500))
async def get_conversation(conversation_id: str, caller: CallerDep, platform: PlatformDep) -> Any:
    return await conversations.get(platform, caller, conversation_id)


@router.patch("/conversations/{conversation_id}", response_model=ConversationObject,
              responses=error_responses(400, 401, 404, 500))
async def update_conversation(conversation_id: str, body: ConversationUpdate, caller: CallerDep,
                              platform: PlatformDep) -> Any:
    return await conversations.update(platform, caller, conversation_id, body)


@router.delete("/conversations/{conversation_id}", response_model=ConversationDeleted,
               responses=error_responses(401, 404, 500))
async def delete_conversation(conversation_id: str, caller: CallerDep, platform: PlatformDep) -> Any:
    return await conversations.delete(platform, caller, conversation_id)


@router.post("/conversations/{conversation_id}/messages", response_model=ConversationObject,
             responses=error_responses(400, 401, 404, 500))
async def append_messages(conversation_id: str, body: MessagesAppend, caller: CallerDep,
                          platform: PlatformDep) -> Any:
    return await conversations.append_messages(platform, caller, conversation_id, body)


@router.get(
    "/conversations/{conversation_id}/export",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}, "text/markdown": {}},
              "description": "The conversation as an attachment: the Conversation object, or Markdown"},
        **error_responses(400, 401, 404, 500),
    },
)
async def export_conversation(conversation_id: str, caller: CallerDep, platform: PlatformDep,
                              format: Literal["json", "markdown"] = "json") -> Response:
    return await conversations.export(platform, caller, conversation_id, format)
