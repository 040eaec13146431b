"""Knowledge bases (spec §2.11): create, edit, list, delete, capacity; and retrieval for the chat tool."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.knowledge import (
    Capacity,
    CapacityFigures,
    KnowledgeCreate,
    KnowledgeObject,
    KnowledgePage,
    KnowledgeUpdate,
)
from glmstack.knowledge.indexer import MAX_BYTES, MAX_WORDS, embedding_model_for
from glmstack.store.knowledge import KnowledgeBase, VectorsUnavailableError

MAX_PAGE = 10_000_000
MAX_PAGE_SIZE = 100


def unix_seconds(moment: datetime) -> int:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def knowledge_object(base: KnowledgeBase) -> KnowledgeObject:
    return KnowledgeObject(
        id=base.id, name=base.name, description=base.description, icon=base.icon, background=base.background,
        embedding_id=base.embedding_id, customer_identifier=base.customer_identifier, bucket_id=base.bucket_id,
        word_num=base.word_num, length=base.length, document_size=base.document_size,
    )


def check_embedding_id(platform: Platform, embedding_id: int) -> None:
    model = embedding_model_for(embedding_id)
    if model is None:
        raise PlatformError(1214, f"embedding_id {embedding_id} is not one of 1, 2, 3 (embedding-2)",
                            field="embedding_id")
    if model not in platform.embedders:
        raise PlatformError(1214, f"{model} is not served here (see GLMSTACK_EMBEDDING_MODELS)",
                            field="embedding_id")


def require_vectors(platform: Platform) -> None:
    if not platform.store.knowledge.vectors_available():
        raise PlatformError(500, str(VectorsUnavailableError(
            "knowledge bases need the pgvector extension in this PostgreSQL database"
            if platform.store.dialect == "postgresql" else
            "knowledge bases need the sqlite-vec extension, which this Python's sqlite3 cannot load")))


async def get_base(platform: Platform, caller: Caller, knowledge_id: str) -> KnowledgeBase:
    base = await run_in_threadpool(platform.store.knowledge.get_base, caller.key_id, knowledge_id)
    if base is None:
        raise PlatformError(1214, f"no knowledge base {knowledge_id!r}", field="knowledge_id", http_status=404)
    return base


async def create(platform: Platform, caller: Caller, body: KnowledgeCreate) -> KnowledgeObject:
    check_embedding_id(platform, body.embedding_id)
    require_vectors(platform)
    knowledge_id = await run_in_threadpool(
        lambda: platform.store.knowledge.create_base(
            caller.key_id, name=body.name, description=body.description or "", embedding_id=body.embedding_id,
            icon=body.icon, background=body.background, customer_identifier=body.customer_identifier,
            bucket_id=body.bucket_id))
    return knowledge_object(await get_base(platform, caller, knowledge_id))


async def modify(platform: Platform, caller: Caller, knowledge_id: str, body: KnowledgeUpdate) -> KnowledgeObject:
    if body.embedding_id is None and body.name is None and body.description is None:
        raise PlatformError(1213, "give at least one of embedding_id, name, description", field="name")
    if body.embedding_id is not None:
        check_embedding_id(platform, body.embedding_id)
        base = await get_base(platform, caller, knowledge_id)
        # Vectors of another model cannot be searched with this one's queries.
        if base.document_size and embedding_model_for(base.embedding_id) != embedding_model_for(body.embedding_id):
            raise PlatformError(1214, "the embedding model of a base with documents cannot change",
                                field="embedding_id")
    changed = await run_in_threadpool(
        lambda: platform.store.knowledge.update_base(
            caller.key_id, knowledge_id, name=body.name, description=body.description,
            embedding_id=body.embedding_id, icon=body.icon, background=body.background))
    if not changed:
        raise PlatformError(1214, f"no knowledge base {knowledge_id!r}", field="knowledge_id", http_status=404)
    return knowledge_object(await get_base(platform, caller, knowledge_id))


async def query(platform: Platform, caller: Caller, page: int, size: int) -> KnowledgePage:
    # a page past MAX_PAGE: its offset would overflow the database's 64-bit integers (and nothing is there)
    if not 1 <= page <= MAX_PAGE or not 1 <= size <= MAX_PAGE_SIZE:
        raise PlatformError(1214, f"page 1-{MAX_PAGE} and size 1-{MAX_PAGE_SIZE}",
                            field="size" if 1 <= page <= MAX_PAGE else "page")
    bases, total = await run_in_threadpool(
        lambda: platform.store.knowledge.list_bases(caller.key_id, page=page, size=size))
    return KnowledgePage(list=[knowledge_object(b) for b in bases], total=total)


async def delete(platform: Platform, caller: Caller, knowledge_id: str) -> None:
    blobs = await run_in_threadpool(platform.store.knowledge.delete_base, caller.key_id, knowledge_id)
    if blobs is None:
        raise PlatformError(1214, f"no knowledge base {knowledge_id!r}", field="knowledge_id", http_status=404)
    for blob in blobs:
        await run_in_threadpool(platform.store.blobs.delete, blob)


async def capacity(platform: Platform, caller: Caller) -> Capacity:
    words, size = await run_in_threadpool(platform.store.knowledge.usage, caller.key_id)
    return Capacity(used=CapacityFigures(word_num=words, length=size),
                    total=CapacityFigures(word_num=MAX_WORDS, length=MAX_BYTES))
