"""POST/GET /files, DELETE /files/{id}, GET /files/{id}/content (spec §2.10)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.schemas.errors import error_responses
from glmstack.api.schemas.files import ExtractedContent, FileDeleted, FileList, FileObject, UploadForm
from glmstack.api.services import files

router = keyed_router(tags=["files"])

MAX_LIST_LIMIT = 100


@router.post(
    "/files",
    response_model=None,  # retrieval uploads answer the document result instead
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": UploadForm.model_json_schema()}},
        }
    },
    responses={
        200: {"model": FileObject, "description": "The file; for purpose retrieval the document upload "
                                                  "result ({successInfos, failedInfos})"},
        435: {"description": "The file is over its purpose's cap (spec §4.1)"},
        **error_responses(400, 401, 404, 500),
    },
)
async def upload_file(request: Request, caller: CallerDep, platform: PlatformDep) -> Any:
    return await files.upload(platform, caller, request)


@router.get(
    "/files",
    response_model=None,  # with purpose retrieval: the knowledge base's documents
    responses={200: {"model": FileList}, **error_responses(400, 401, 500)},
)
async def list_files(
    caller: CallerDep,
    platform: PlatformDep,
    purpose: str | None = None,
    knowledge_id: str | None = None,
    page: Annotated[int, Query(ge=1, le=10_000_000)] = 1,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 10,
    after: str | None = None,
    order: Literal["desc", "asc"] = "desc",
) -> Any:
    return await files.list_files(platform, caller, purpose=purpose, knowledge_id=knowledge_id, page=page,
                                  limit=limit, after=after, order=order)


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=error_responses(401, 404, 500))
async def delete_file(file_id: str, caller: CallerDep, platform: PlatformDep) -> Any:
    return await files.delete(platform, caller, file_id)


@router.get(
    "/files/{file_id}/content",
    response_model=ExtractedContent,
    responses={
        200: {"content": {"application/octet-stream": {}},
              "description": "file-extract: the extracted text; batch and fine-tune: the file itself"},
        **error_responses(401, 404, 500),
    },
)
async def file_content(file_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return await files.content(platform, caller, file_id)

