"""POST /chat/completions — sync and SSE (spec §2.1)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.chat import ChatCompletion, ChatCompletionRequest
from glmstack.api.schemas.errors import error_responses
from glmstack.api.services import chat

router = keyed_router(tags=["chat"])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses={
        200: {
            # the schema itself is put in components by api/openapi.py
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
            "description": 'With "stream": true, `data: <ChatCompletionChunk>` events, then `data: [DONE]`',
        },
        **error_responses(400, 401, 413, 429, 500),
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, caller: CallerDep, platform: PlatformDep
) -> ChatCompletion | Response:
    completion_id, log_fields = request.state.request_id, request.state.log
    if body.stream:
        return await chat.stream(platform, caller, body, completion_id, request.receive, log_fields)
    completion = await chat.complete(platform, caller, body, completion_id, request.receive, log_fields)
    # Serialized here, once: returned as a model, FastAPI would validate it again against response_model
    # (which stays above for the OpenAPI schema) before encoding it — a millisecond per request.
    return Response(completion.model_dump_json(exclude_none=True), media_type="application/json")
