"""Fine-tuning jobs and models (spec §2.13)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.errors import error_responses
from glmstack.api.schemas.fine_tuning import (
    FineTunedModelDeleted,
    FineTuningJobCreate,
    FineTuningJobList,
    FineTuningJobObject,
    JobEventList,
)
from glmstack.api.services import fine_tuning

router = keyed_router(tags=["fine-tuning"])

MAX_LIST_LIMIT = 100


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


@router.post("/fine_tuning/jobs", response_model=FineTuningJobObject, responses=error_responses(400, 401, 404, 500))
async def create_job(body: FineTuningJobCreate, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await fine_tuning.create(platform, caller, body))


@router.get("/fine_tuning/jobs", response_model=FineTuningJobList, responses=error_responses(401, 500))
async def list_jobs(caller: CallerDep, platform: PlatformDep, after: str | None = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 20) -> Response:
    return _json(await fine_tuning.list_jobs(platform, caller, after=after, limit=limit))


@router.get("/fine_tuning/jobs/{job_id}", response_model=FineTuningJobObject,
            responses=error_responses(401, 404, 500))
async def retrieve_job(job_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await fine_tuning.retrieve(platform, caller, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=JobEventList,
            responses=error_responses(401, 404, 500))
async def job_events(job_id: str, caller: CallerDep, platform: PlatformDep, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 50) -> Response:
    return _json(await fine_tuning.events(platform, caller, job_id, after=after, limit=limit))


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJobObject,
             responses=error_responses(401, 404, 500))
async def cancel_job(job_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await fine_tuning.cancel(platform, caller, job_id))


@router.delete("/fine_tuning/jobs/{job_id}", response_model=FineTuningJobObject,
               responses=error_responses(400, 401, 404, 500))
async def delete_job(job_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await fine_tuning.delete_job(platform, caller, job_id))


@router.delete("/fine_tuning/fine_tuned_models/{fine_tuned_model}", response_model=FineTunedModelDeleted,
               responses=error_responses(401, 404, 500))
async def delete_fine_tuned_model(fine_tuned_model: str, request: Request, caller: CallerDep,
                                  platform: PlatformDep) -> Response:
    return _json(await fine_tuning.delete_model(platform, caller, fine_tuned_model, request.state.request_id))
