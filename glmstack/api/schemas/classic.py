"""POST / — the endpoint of ChatGLM's classic `api.py`, so its clients keep working."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from glmstack.api.schemas.fields import JsonList, Text


class ClassicRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Text
    history: JsonList | None = Field(
        None, description="[[query, response], ...] (ChatGLM-6B/2) or [{role, content}, ...] (ChatGLM3)"
    )
    max_length: int | None = Field(
        None, ge=1, description="Prompt plus reply, in tokens; default 2048; at most the model's context"
    )
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Default 0.7")
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="Default 0.95; 0 means greedy")


class ClassicResponse(BaseModel):
    response: str
    history: list[Any] = Field(description="The history sent, with this turn appended in the same form")
    status: int = 200
    time: str = Field(description='Local time, "%Y-%m-%d %H:%M:%S"')
