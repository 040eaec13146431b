"""The files API's answers (spec §2.10; shapes from the SDK's FileObject, ListOfFileObject, FileDeleted and
the doc's extraction example). The request is multipart and read by api/uploads.py, not by pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Purpose = Literal["fine-tune", "batch", "file-extract", "retrieval"]


class FileObject(BaseModel):
    id: str = Field(description='"file-" and 24 hex digits')
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds")
    filename: str = Field(description="The uploaded file's name (its last path segment, control characters "
                                      "removed); only ever a label")
    purpose: str
    status: str = "processed"
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    deleted: bool = True
    object: Literal["file"] = "file"


class ExtractedContent(BaseModel):
    """GET /files/{id}/content of a file-extract file."""

    content: str = Field(description="The file's text")
    file_type: str = Field(description="MIME type")
    filename: str
    title: str
    type: Literal["file"] = "file"


class UploadForm(BaseModel):
    """The multipart form of POST /files, for the OpenAPI document (the SDK sends `purpose` before `file`)."""

    purpose: Purpose
    file: bytes = Field(json_schema_extra={"format": "binary"})
    knowledge_id: str | None = Field(None, description="purpose retrieval: the knowledge base")
    sentence_size: int | None = Field(None, description="purpose retrieval: chunk size, 20-2000")
    custom_separator: list[str] | None = Field(
        None, alias="custom_separator[]", description="purpose retrieval: chunk separators"
    )
