"""POST/GET /batches, GET /batches/{id}, POST /batches/{id}/cancel (spec §2.9); POST /async/chat/completions
and GET /async-result/{id} (§2.3-2.4)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.batches import AsyncTaskStatus, Batch, BatchCreate, BatchList
from glmstack.api.schemas.chat import ChatCompletionRequest
from glmstack.api.schemas.errors import error_responses
from glmstack.api.services import batches

router = keyed_router(tags=["batches"])

MAX_LIST_LIMIT = 100


def _json(model: Batch | BatchList | AsyncTaskStatus) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


@router.post("/batches", response_model=Batch, responses=error_responses(400, 401, 404, 500))
async def create_batch(body: BatchCreate, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await batches.create(platform, caller, body))


@router.get("/batches", response_model=BatchList, responses=error_responses(400, 401, 500))
async def list_batches(caller: CallerDep, platform: PlatformDep, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 20) -> Response:
    return _json(await batches.list_batches(platform, caller, after=after, limit=limit))


@router.get("/batches/{batch_id}", response_model=Batch, responses=error_responses(401, 404, 500))
async def retrieve_batch(batch_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await batches.retrieve(platform, caller, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=Batch, responses=error_responses(401, 404, 500))
async def cancel_batch(batch_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await batches.cancel(platform, caller, batch_id))


@router.post("/async/chat/completions", response_model=AsyncTaskStatus, tags=["chat"],
             responses=error_responses(400, 401, 413, 429, 500))
async def create_async_chat(body: ChatCompletionRequest, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await batches.submit_chat(platform, caller, body))


@router.get("/async-result/{task_id}", response_model=AsyncTaskStatus, tags=["chat"],
            responses=error_responses(401, 404, 500))
async def async_result(task_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await batches.result(platform, caller, task_id))
