"""POST / — ChatGLM's classic api.py endpoint: {prompt, history, max_length, top_p, temperature} ->
{response, history, status, time}."""

from __future__ import annotations

from fastapi import Request

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.classic import ClassicRequest, ClassicResponse
from glmstack.api.schemas.errors import error_responses
from glmstack.api.services import classic

router = keyed_router(tags=["classic"])


@router.post(
    "/",
    response_model=ClassicResponse,
    responses=error_responses(400, 401, 413, 429, 500),
    summary="ChatGLM api.py compatible chat",
)
async def classic_chat(
    body: ClassicRequest, request: Request, caller: CallerDep, platform: PlatformDep
) -> ClassicResponse:
    return await classic.answer(
        platform, caller, body, request.state.request_id, request.receive, request.state.log
    )
