"""GET /models (OpenAI-compatible listing; the platform doc has no such endpoint)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class GenerationDefaultsCard(BaseModel):
    """What a chat request that leaves these out gets."""

    temperature: float
    top_p: float
    max_tokens: int
    source: str = Field(description="The model's own recommendation (where it came from), or `platform`")


class ModelCard(BaseModel):
    id: str = Field(description="A name the chat endpoint accepts as `model`")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmstack"
    root: str = Field(description="The model actually served under this name")
    generation_defaults: GenerationDefaultsCard


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
