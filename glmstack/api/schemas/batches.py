"""Batch API (spec §2.9) and async chat (§2.3-2.4): requests and answers as the SDKs read them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glmstack.api.schemas.conversations import StoredText
from glmstack.knowledge.jsonl_checks import BATCH_URLS

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: StoredText = Field(min_length=1, max_length=64, description="A file uploaded with purpose batch")
    endpoint: str = Field(description="/v4/chat/completions or /v4/embeddings (the SDK's /v1/... too)")
    completion_window: str | None = Field(None, description='Deprecated by the platform; "24h" when null')
    metadata: dict[StoredText, StoredText] | None = Field(
        None, description="Up to 16 pairs; keys <= 64, values <= 512 chars")
    auto_delete_input_file: bool | None = Field(None, description="Default true: the input file is deleted "
                                                                  "once the batch completes")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value not in BATCH_URLS:
            raise ValueError(f"must be one of {', '.join(sorted(BATCH_URLS))}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} pairs")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"keys of at most {MAX_METADATA_KEY} and values of at most "
                                 f"{MAX_METADATA_VALUE} characters")
        return value


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    line: int | None = None
    message: str
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str = Field(description="validating, failed, in_progress, finalizing, completed, expired, "
                                    "cancelling, cancelled")
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    errors: BatchErrors | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class AsyncTaskStatus(BaseModel):
    """POST /async/chat/completions, and GET /async-result/{id} (choices and usage once SUCCESS)."""

    id: str
    request_id: str
    model: str | None
    task_status: Literal["PROCESSING", "SUCCESS", "FAIL"]
    created: int | None = None
    choices: list[dict[str, Any]] | None = None
    usage: dict[str, int] | None = None
    retrieval: list[dict[str, Any]] | None = None
    error: dict[str, str] | None = Field(default=None, description="FAIL: what the sync call would have answered "
                                                          "(glmstack's field)")
