"""POST /chat/completions (spec §2.1): the request as the SDKs send it, and the response and stream chunk.

Unknown keys and nulls are accepted and ignored: the SDKs always send `response_format: null` and
`thinking: null`, and add `sensitive_word_check`, `meta`, `extra`, `watermark_enabled`, ... (sdk-wire §2).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Lenient):
    type: str = Field(description='"text" (other part types, e.g. "image_url", are refused by text models)')
    text: str | None = None


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="Required except on an assistant message that carries tool_calls"
    )
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="On assistant messages: earlier tool calls"
    )
    tool_call_id: str | None = Field(None, description="On tool messages: the call this result answers")


class ChatCompletionRequest(_Lenient):
    model: str = Field(description='Model code: the served model\'s name or an alias such as "glm-4"')
    messages: list[Message] = Field(min_length=1)
    request_id: str | None = Field(None, max_length=128, description="Echoed back; generated when absent")
    do_sample: bool | None = Field(None, description="false: greedy decoding (temperature and top_p ignored)")
    stream: bool | None = Field(None, description="true: server-sent events ending with data: [DONE]")
    temperature: float | None = Field(None, ge=0.0, le=1.0, description="Default 0.95; 0 means greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Default 0.7")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens in the reply; default 1024")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the reply)")
    seed: int | None = None
    user_id: str | None = Field(None, min_length=6, max_length=128, description="Your end user's id")
    tools: list[dict[str, Any]] | None = Field(None, description="Tool definitions, passed to the model")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Accepted; only "auto" for now')
    n: int | None = Field(None, ge=1, le=1, description="OpenAI compatibility: one choice only")
    user: str | None = Field(None, description="OpenAI compatibility: accepted and ignored")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int = 0
    finish_reason: Literal["stop", "length", "sensitive", "network_error", "tool_calls"]
    message: AssistantMessage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix seconds")
    model: str = Field(description="The model code as requested")
    request_id: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = Field(None, description="Only on the last chunk")


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a stream. The last chunk carries finish_reason and usage (and content_filter
    when the output was stopped as sensitive); `data: [DONE]` follows it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    content_filter: list[dict[str, Any]] | None = None
