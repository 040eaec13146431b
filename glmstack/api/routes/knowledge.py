"""Knowledge bases and documents (spec §2.11-2.12). Uploading a document is POST /files with purpose
"retrieval" (routes/files.py); listing a base's documents is GET /files?purpose=retrieval&knowledge_id=...."""

from __future__ import annotations

from fastapi.responses import Response

from glmstack.api.auth import CallerDep, keyed_router
from glmstack.api.deps import PlatformDep
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.errors import error_responses
from glmstack.api.schemas.knowledge import (
    Capacity,
    Deleted,
    DocumentEdit,
    DocumentObject,
    KnowledgeCreate,
    KnowledgeObject,
    KnowledgePage,
    KnowledgeUpdate,
)
from glmstack.api.services import documents, knowledge

router = keyed_router(tags=["knowledge"])
ERRORS = error_responses(400, 401, 404, 500)


def _json(model: KnowledgeObject | DocumentObject | Deleted | Capacity | KnowledgePage) -> Response:
    return Response(model.model_dump_json(exclude_none=True), media_type="application/json")


@router.post("/knowledge", response_model=KnowledgeObject, responses=ERRORS)
async def create_knowledge(body: KnowledgeCreate, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await knowledge.create(platform, caller, body))


@router.get("/knowledge/capacity", response_model=Capacity, responses=ERRORS)
async def knowledge_capacity(caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await knowledge.capacity(platform, caller))


@router.get("/knowledge", response_model=KnowledgePage, responses=ERRORS)
async def list_knowledge(caller: CallerDep, platform: PlatformDep, page: int = 1, size: int = 10) -> Response:
    return _json(await knowledge.query(platform, caller, page, size))


@router.put("/knowledge/{knowledge_id}", response_model=KnowledgeObject, responses=ERRORS)
async def modify_knowledge(knowledge_id: str, body: KnowledgeUpdate, caller: CallerDep,
                           platform: PlatformDep) -> Response:
    return _json(await knowledge.modify(platform, caller, knowledge_id, body))


@router.delete("/knowledge/{knowledge_id}", response_model=Deleted, responses=ERRORS)
async def delete_knowledge(knowledge_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    await knowledge.delete(platform, caller, knowledge_id)
    return _json(Deleted(id=knowledge_id, object="knowledge"))


@router.get("/document/{document_id}", response_model=DocumentObject, responses=ERRORS)
async def retrieve_document(document_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await documents.retrieve(platform, caller, document_id))


@router.put("/document/{document_id}", response_model=DocumentObject, responses=ERRORS)
async def edit_document(document_id: str, body: DocumentEdit, caller: CallerDep, platform: PlatformDep) -> Response:
    return _json(await documents.edit(platform, caller, document_id, body))


@router.delete("/document/{document_id}", response_model=Deleted, responses=ERRORS)
async def delete_document(document_id: str, caller: CallerDep, platform: PlatformDep) -> Response:
    if not await documents.delete(platform, caller, document_id):
        raise PlatformError(1214, f"no document {document_id!r}", field="document_id", http_status=404)
    return _json(Deleted(id=document_id, object="document"))
