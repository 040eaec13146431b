"""Knowledge documents (spec §2.10 purpose "retrieval", §2.12, §6.2): upload into a base, list, detail, edit,
delete. An upload is stored and queued at once; the indexer extracts, chunks and embeds it in the background
(`embedding_stat` 0 -> 1, or 2 with `failInfo`)."""

from __future__ import annotations

from pathlib import PurePath

from starlette.concurrency import run_in_threadpool

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.knowledge import DocumentEdit, DocumentObject, DocumentPage, FailInfo
from glmstack.api.services.knowledge import get_base, require_vectors, unix_seconds
from glmstack.api.uploads import StagedUpload
from glmstack.knowledge.chunking import DEFAULT_SENTENCE_SIZE, MAX_SENTENCE_SIZE, MIN_SENTENCE_SIZE
from glmstack.knowledge.indexer import MAX_BYTES
from glmstack.store.knowledge import FAILED, Document

# What a knowledge base reads (spec §6.3 lists doc, docx, pdf, xlsx; the rest are what extraction reads too).
# Legacy .doc is accepted at the door and fails in the indexer with a message saying to save it as .docx.
DOCUMENT_EXTENSIONS = frozenset({".pdf", ".docx", ".doc", ".xlsx", ".pptx", ".txt", ".md", ".csv"})
MAX_PAGE = 100


def document_object(document: Document) -> DocumentObject:
    fail = (FailInfo(embedding_code=document.fail_code or 0, embedding_msg=document.fail_msg or "")
            if document.embedding_stat == FAILED else None)
    return DocumentObject(
        id=document.id, name=document.name, url=document.url, knowledge_id=document.knowledge_id,
        knowledge_type=document.knowledge_type, custom_separator=document.custom_separator or ["\n"],
        sentence_size=document.sentence_size, length=document.length, word_num=document.word_num,
        embedding_stat=document.embedding_stat, failInfo=fail, created_at=unix_seconds(document.created_at),
    )


def _knowledge_type_for(filename: str) -> int:
    """Spreadsheets are tables (type 3, Q&A from a table: one chunk per row); everything else an article."""
    return 3 if PurePath(filename).suffix.lower() in (".xlsx", ".csv") else 1


async def upload(platform: Platform, caller: Caller, knowledge_id: str | None, staged: StagedUpload,
                 custom_separator: list[str] | None, sentence_size: int | None) -> dict:
    """POST /files with purpose "retrieval". Owns `staged`: adopts it into the blob store or deletes it."""
    try:
        if not knowledge_id:
            raise PlatformError(1213, "purpose retrieval needs knowledge_id", field="knowledge_id")
        if sentence_size is not None and not MIN_SENTENCE_SIZE <= sentence_size <= MAX_SENTENCE_SIZE:
            raise PlatformError(1214, f"sentence_size must be {MIN_SENTENCE_SIZE}-{MAX_SENTENCE_SIZE}",
                                field="sentence_size")
        require_vectors(platform)
        await get_base(platform, caller, knowledge_id)
        suffix = PurePath(staged.filename).suffix.lower()
        if suffix not in DOCUMENT_EXTENSIONS:
            return {"successInfos": [], "failedInfos": [{
                "documentId": None, "filename": staged.filename,
                "failReason": f"不支持的文件格式 (unsupported format {suffix or '(none)'}; "
                              f"accepted: {', '.join(sorted(DOCUMENT_EXTENSIONS))})"}]}
        _, used_bytes = await run_in_threadpool(platform.store.knowledge.usage, caller.key_id)
        if used_bytes + staged.size > MAX_BYTES:
            return {"successInfos": [], "failedInfos": [{
                "documentId": None, "filename": staged.filename,
                "failReason": "知识库空间已满 (the knowledge space of 1 GB is full)"}]}
        blob = await run_in_threadpool(platform.store.blobs.adopt, staged.path)
    finally:
        if staged.path.exists():
            staged.path.unlink(missing_ok=True)
    try:
        document_id = await run_in_threadpool(
            lambda: platform.store.knowledge.create_document(
                caller.key_id, knowledge_id=knowledge_id, name=staged.filename, length=staged.size,
                knowledge_type=_knowledge_type_for(staged.filename), custom_separator=custom_separator,
                sentence_size=sentence_size or DEFAULT_SENTENCE_SIZE, blob=blob))
    except BaseException:
        await run_in_threadpool(platform.store.blobs.delete, blob)
        raise
    platform.indexer.wake()
    return {"successInfos": [{"documentId": document_id, "filename": staged.filename}], "failedInfos": []}


async def list_for_files(platform: Platform, caller: Caller, knowledge_id: str | None, page: int, limit: int,
                         order: str) -> dict:
    """GET /files?purpose=retrieval&knowledge_id=...: the SDK's `knowledge.document.list`."""
    if not knowledge_id:
        raise PlatformError(1213, "purpose retrieval needs knowledge_id", field="knowledge_id")
    if page < 1 or not 1 <= limit <= MAX_PAGE:
        raise PlatformError(1214, f"page >= 1 and limit 1-{MAX_PAGE}", field="limit" if page >= 1 else "page")
    await get_base(platform, caller, knowledge_id)
    found, total = await run_in_threadpool(
        lambda: platform.store.knowledge.list_documents(caller.key_id, knowledge_id, page=page, limit=limit,
                                                        order="asc" if order == "asc" else "desc"))
    listed = DocumentPage(list=[document_object(d) for d in found], total=total,
                          has_more=page * limit < total)
    return listed.model_dump(exclude_none=True)


async def retrieve(platform: Platform, caller: Caller, document_id: str) -> DocumentObject:
    document = await run_in_threadpool(platform.store.knowledge.get_document, caller.key_id, document_id)
    if document is None:
        raise PlatformError(1214, f"no document {document_id!r}", field="document_id", http_status=404)
    return document_object(document)


async def edit(platform: Platform, caller: Caller, document_id: str, body: DocumentEdit) -> DocumentObject:
    """New chunking settings; per the documentation they apply only to knowledge_type 5 (custom), so other
    types keep their separators and size and are only re-typed."""
    custom = body.knowledge_type == 5
    changed = await run_in_threadpool(
        lambda: platform.store.knowledge.reconfigure_document(
            caller.key_id, document_id, knowledge_type=body.knowledge_type,
            custom_separator=body.custom_separator if custom else None,
            sentence_size=body.sentence_size if custom else None))
    if not changed:
        raise PlatformError(1214, f"no document {document_id!r}", field="document_id", http_status=404)
    platform.indexer.wake()
    return await retrieve(platform, caller, document_id)


async def delete(platform: Platform, caller: Caller, document_id: str) -> bool:
    document = await run_in_threadpool(platform.store.knowledge.delete_document, caller.key_id, document_id)
    if document is None:
        return False
    if document.blob:
        await run_in_threadpool(platform.store.blobs.delete, document.blob)
    return True
