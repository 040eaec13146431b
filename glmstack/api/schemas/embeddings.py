"""POST /embeddings (spec §2.7): the request as the zhipuai and openai SDKs send it, and the response.

Unknown keys are ignored (the SDKs may add `sensitive_word_check`, `extra_body` keys, ...). `input` is a string
or a list of strings: OpenAI's token-id lists are refused (1214), since the ids would be another model's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from glmstack.api.schemas.fields import Text

# Inputs per request. The body size (Settings.max_body_bytes) bounds their total length; each is truncated to
# the model's max_tokens (as sentence-transformers does), so a long one costs no more than a full-length one.
MAX_INPUTS = 256
MAX_DIMENSIONS = 8192
MAX_ID_CHARS = 128
MAX_USER_CHARS = 1024
InputText = Annotated[Text, Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(max_length=MAX_ID_CHARS, description="embedding-2, embedding-3, or a configured name")
    input: InputText | Annotated[list[InputText], Field(min_length=1, max_length=MAX_INPUTS)] = Field(
        description=f"A text, or a list of up to {MAX_INPUTS} texts; none empty. A text longer than the "
        "model's input limit is truncated to it (the usage counts the tokens embedded)."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        """One clear message per mistake, naming the text at fault (pydantic's, for a union, would report
        whichever member it tried last)."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise ValueError("must be a string or a list of strings")
        if not texts:
            raise ValueError("must not be an empty list")
        if len(texts) > MAX_INPUTS:
            raise ValueError(f"{len(texts)} texts; at most {MAX_INPUTS} per request")
        for index, text in enumerate(texts):
            where = "input" if isinstance(value, str) else f"input[{index}]"
            if not isinstance(text, str):
                raise ValueError(f"{where} is not a string (token id lists are not accepted)")
            if not text:
                raise ValueError(f"{where} is empty")
        return value
    dimensions: int | None = Field(
        None, ge=1, le=MAX_DIMENSIONS,
        description="embedding-3: 256, 512, 1024 or 2048 (default 2048); embedding-2: 1024 only; other "
        "names: any size (default: the model's own)",
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description='"float" (default) or "base64": little-endian float32 bytes, as OpenAI clients ask'
    )
    user: Text | None = Field(None, max_length=MAX_USER_CHARS, description="Accepted, not used")
    request_id: Text | None = Field(None, max_length=MAX_ID_CHARS, description="Accepted, not used")
    sensitive_word_check: dict[str, object] | None = Field(None, description="Accepted, not used")


class Embedding(BaseModel):
    embedding: list[float] | str = Field(description="The vector, or its base64 float32 bytes")
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class EmbeddingList(BaseModel):
    model: str
    object: Literal["list"] = "list"
    data: list[Embedding]
    usage: EmbeddingUsage
