"""Fine-tuning jobs (spec §2.13, §5): the request and the objects as the SDK reads them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glmstack.api.schemas.conversations import StoredText

MAX_SUFFIX = 8
AUTO = "auto"


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    learning_rate_multiplier: float | Literal["auto"] | None = Field(None, description='"auto" = 1.0; (0, 5]')
    batch_size: int | Literal["auto"] | None = Field(None, description='"auto" = 8; [1, 32]')
    n_epochs: int | Literal["auto"] | None = Field(None, description='"auto" = 3; [1, 10]')

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, float | int) and not 0 < value <= 5:
            raise ValueError("must be in (0, 5]")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 32:
            raise ValueError("must be in [1, 32]")
        return value

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and not 1 <= value <= 10:
            raise ValueError("must be in [1, 10]")
        return value


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StoredText = Field(min_length=1, max_length=200, description="The base model: the served model's names")
    training_file: str = Field(min_length=1, max_length=64, description="A file with purpose fine-tune")
    validation_file: str | None = Field(None, max_length=64)
    hyperparameters: Hyperparameters | None = None
    fine_tuning_method: Literal["lora", "ptuning"] | None = Field(
        None, description='"lora" (default) or "ptuning" (P-Tuning v2; glmstack\'s); "full" is not offered')
    extra_hyperparameters: dict[str, Any] | None = Field(
        None, description="glmstack: max_steps, save_every, eval_every, max_length, lora_rank, lora_alpha, "
                          "pre_seq_len, seed (positive integers); prefix_init \"random\" or \"data\" "
                          "(P-Tuning's start)")
    suffix: str | None = Field(None, max_length=MAX_SUFFIX)
    request_id: StoredText | None = Field(None, max_length=128)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value and not all(c.isalnum() or c in "-_" for c in value):
            raise ValueError("letters, digits, - and _ only")
        return value or None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    fine_tuned_model: str
    status: str = Field(description="created, validating_files, queued, running, succeeded, failed, cancelled")
    training_file: str
    validation_file: str = Field(description='"" when none (as the documentation shows)')
    result_files: list[str]
    hyperparameters: dict[str, Any]
    created_at: int
    finished_at: int | None = None
    trained_tokens: int | None = None
    request_id: str | None = None
    error: JobError | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobObject]
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    type: str
    created_at: int
    level: str | None = None
    message: str | None = None
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventObject]
    has_more: bool


class FineTunedModelDeleted(BaseModel):
    request_id: str
    model_name: str
    delete_status: Literal["deleting", "deleted"]
    status: str = "deleted"
