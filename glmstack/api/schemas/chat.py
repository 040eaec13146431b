"""POST /chat/completions (spec §2.1): the request as the SDKs send it, and the response and stream chunk.

Unknown keys and nulls are accepted and ignored: the SDKs always send `response_format: null` and
`thinking: null`, and add `sensitive_word_check`, `meta`, `extra`, `watermark_enabled`, ... (sdk-wire §2).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

from glmstack.api.schemas.fields import JsonObject, Text
from glmstack.api.schemas.tools import (
    MAX_TOOLS,
    PersonaMeta,
    ResponseFormat,
    Thinking,
    Tool,
    ToolCall,
    ToolCallChunk,
    ToolChoice,
)

# Bounds on what a request may carry besides the body size (Settings.max_body_bytes, which also bounds the
# prose fields: message content, tool descriptions), the message count (Settings.max_messages) and the
# depth of free-form JSON (fields.MAX_JSON_DEPTH).
MAX_ID_CHARS = 128  # model codes, request ids, tool call ids
INT64 = 2**63
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(_Lenient):
    type: Text = Field(
        description='"text" (other part types, e.g. "image_url", are refused by text models)',
        json_schema_extra={"enum": ["text"]},
    )
    text: Text | None = None


# What the service checks beyond the fields (1213): content on every message but an assistant message that
# carries tool_calls. Published as JSON Schema conditions so a client knows it.
MESSAGE_CONDITIONS: JsonDict = {
    "allOf": [
        {
            "if": {"properties": {"role": {"enum": ["system", "user", "tool"]}}},
            "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        },
        {
            "if": {"properties": {"role": {"const": "assistant"}}},
            "then": {
                "anyOf": [
                    {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                    {"required": ["tool_calls"], "properties": {"tool_calls": {"type": "array", "minItems": 1}}},
                ]
            },
        },
    ]
}


class Message(_Lenient):
    model_config = ConfigDict(json_schema_extra=MESSAGE_CONDITIONS)

    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(
        None, description="Required except on an assistant message that carries tool_calls"
    )
    tool_calls: list[JsonObject] | None = Field(
        None, max_length=MAX_TOOLS, description="On assistant messages: earlier tool calls"
    )
    tool_call_id: Text | None = Field(
        None, max_length=MAX_ID_CHARS, description="On tool messages: the call this result answers"
    )
    reasoning_content: Text | None = Field(
        None, description="On assistant messages, as replies carry it: accepted, never fed back to the model"
    )


class ChatCompletionRequest(_Lenient):
    model: Text = Field(
        max_length=MAX_ID_CHARS,
        description='Model code: the served model\'s name or an alias such as "glm-4"',
    )
    messages: list[Message] = Field(min_length=1)
    request_id: Text | None = Field(
        None, max_length=MAX_ID_CHARS, description="Echoed back; generated when absent"
    )
    do_sample: bool | None = Field(None, description="false: greedy decoding (temperature and top_p ignored)")
    stream: bool | None = Field(None, description="true: server-sent events ending with data: [DONE]")
    temperature: float | None = Field(
        None, ge=0.0, le=1.0, description="Default: the model's own (GET /models), else 0.95; 0 means greedy"
    )
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Default: the model's own (GET /models), else 0.7")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens in the reply, at most the model's context length; default: the model's own, else 1024",
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = Field(
        None, description="Stop strings (not included in the reply)"
    )
    seed: int | None = Field(None, ge=-INT64, lt=INT64, description="A 64-bit integer")
    user_id: Text | None = Field(None, min_length=6, max_length=128, description="Your end user's id")
    tools: list[Tool] | None = Field(
        None, max_length=MAX_TOOLS, description="Tool definitions, passed to the model"
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description='"auto" (default), "none", "required" (a call to some tool), or a function to call: '
        '{"type": "function", "function": {"name": ...}} or {"name": ...}',
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false: at most one tool call per reply (default: as many as the model's syntax allows)"
    )
    response_format: ResponseFormat | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}'
    )
    thinking: Thinking | None = Field(None, description='{"type": "enabled" | "disabled"} for thinking models')
    meta: PersonaMeta | None = Field(None, description="charglm-3 / emohaa: the persona and the user")
    n: int | None = Field(None, ge=1, le=1, description="OpenAI compatibility: one choice only")
    user: Text | None = Field(None, max_length=MAX_ID_CHARS, description="OpenAI compatibility: ignored")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(None, description="Absent when the reply is tool calls (spec §2.1's example)")
    reasoning_content: str | None = Field(None, description="A thinking model's reasoning, before the answer")
    tool_calls: list[ToolCall] | None = None


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
    retrieval: list[dict[str, Any]] | None = Field(
        None, description="With a retrieval tool: the knowledge chunks the model was given (glmstack's field)")


class Delta(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None


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
