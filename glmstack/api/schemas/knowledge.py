"""Knowledge bases and their documents (spec §2.11-2.12, §6): requests as the zhipuai SDK sends them.

The SDK sends every optional field, `null` when not given (sdk-wire §2), so every field but the required ones
is optional and nullable. `embedding_id` may be an int or a numeric string (the doc types it both ways).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from glmstack.api.schemas.fields import Text

# The documentation's limits are 20 / 100 characters, the SDK's docstrings 100 / 500: the larger ones, so that
# nothing the SDK documents is refused.
MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 500
MAX_SEPARATOR_CHARS = 64
MAX_SEPARATORS = 16
Icon = Literal["question", "book", "seal", "wrench", "tag", "horn", "house"]
Background = Literal["blue", "red", "orange", "purple", "sky"]


def _int_from_digits(value: object) -> object:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return value


EmbeddingId = Annotated[int, BeforeValidator(_int_from_digits), Field(ge=1, le=2**31)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class KnowledgeCreate(_Lenient):
    embedding_id: EmbeddingId
    name: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]
    description: Annotated[Text, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    customer_identifier: Annotated[Text, Field(max_length=32)] | None = None
    background: Background | None = None
    icon: Icon | None = None
    bucket_id: Annotated[Text, Field(max_length=32)] | None = None


class KnowledgeUpdate(_Lenient):
    """PUT /knowledge/{id}: at least one of embedding_id, name, description (the service checks)."""

    id: Text | None = None
    embedding_id: EmbeddingId | None = None
    name: Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)] | None = None
    description: Annotated[Text, Field(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    background: Background | None = None
    icon: Icon | None = None


class KnowledgeObject(BaseModel):
    id: str
    name: str
    description: str
    icon: str | None = None
    background: str | None = None
    embedding_id: int
    customer_identifier: str | None = None
    bucket_id: str | None = None
    word_num: int = Field(description="characters in the base's documents")
    length: int = Field(description="bytes of the base's documents")
    document_size: int = Field(description="number of documents")


class KnowledgePage(BaseModel):
    object: Literal["list"] = "list"
    data: None = None  # the documentation's example carries "data": null next to "list"
    list: list[KnowledgeObject]
    total: int


class CapacityFigures(BaseModel):
    word_num: int
    length: int


class Capacity(BaseModel):
    used: CapacityFigures
    total: CapacityFigures


Separator = Annotated[Text, Field(min_length=1, max_length=MAX_SEPARATOR_CHARS)]


class DocumentEdit(_Lenient):
    id: Text | None = None
    knowledge_type: Annotated[int, Field(ge=1, le=5)]
    custom_separator: Annotated[list[Separator], Field(max_length=MAX_SEPARATORS)] | None = None
    sentence_size: Annotated[int, Field(ge=20, le=2000)] | None = None
    callback_url: Text | None = None
    callback_header: dict[str, str] | None = None


class FailInfo(BaseModel):
    embedding_code: int
    embedding_msg: str


class DocumentObject(BaseModel):
    id: str
    name: str
    url: str
    knowledge_id: str
    knowledge_type: int
    custom_separator: list[str]
    sentence_size: int
    length: int = Field(description="bytes of the uploaded file")
    word_num: int = Field(description="characters of its text")
    embedding_stat: int = Field(description="0 vectorising, 1 done, 2 failed")
    failInfo: FailInfo | None = None
    created_at: int


class DocumentPage(BaseModel):
    object: Literal["list"] = "list"
    list: list[DocumentObject]
    total: int
    has_more: bool


class Deleted(BaseModel):
    id: str
    deleted: bool = True
    object: str
