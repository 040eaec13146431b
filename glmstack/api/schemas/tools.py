"""What a chat request may ask beyond messages (spec §3, §2.2.3; OpenAI's shapes where the SDKs send them):
tools and tool_choice, response_format, thinking, and the persona `meta` of charglm-3 / emohaa; and the tool
calls a reply carries back.

Every bound the server enforces is declared here, so /openapi.json tells a client generated from it what
will be accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glmstack.api.schemas.fields import JsonObject, Text, plain_json

MAX_TOOLS = 128
MAX_TOOL_NAME_CHARS = 64
FUNCTION_NAME = r"^[A-Za-z0-9_\-]+$"  # spec §3.2: a-z, A-Z, 0-9, _ and -; at most 64 characters
MAX_PERSONA_CHARS = 4096


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=FUNCTION_NAME)
    description: Text | None = None
    parameters: JsonObject | None = Field(
        None, description='JSON Schema of the arguments: an object schema ({"type": "object", ...})',
        # the rule _object_schema enforces, declared so /openapi.json does not call other schemas valid
        json_schema_extra={"properties": {"type": {"const": "object"}, "properties": {"type": "object"}}},
    )

    @model_validator(mode="after")
    def _object_schema(self) -> FunctionDefinition:
        schema = self.parameters or {}
        if schema.get("type", "object") != "object" or not isinstance(schema.get("properties", {}), dict):
            raise ValueError('parameters must be an object schema ({"type": "object", "properties": {...}})')
        return self


class Tool(BaseModel):
    """A tool the model may call: `function` (its arguments follow `parameters`), or a built-in tool type
    (`retrieval`, `web_search`, GLM-4's `python` / `simple_browser` / `cogview`), whose keys are passed on
    as sent. A `retrieval` tool searches a knowledge base first (api/services/retrieval.py)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, json_schema_extra={"allOf": [
        {"if": {"properties": {"type": {"const": "function"}}, "required": ["type"]},
         "then": {"required": ["function"], "properties": {"function": {"type": "object"}}}},
        {"if": {"properties": {"type": {"const": "retrieval"}}, "required": ["type"]},
         "then": {"required": ["retrieval"], "properties": {"retrieval": {
             "type": "object", "required": ["knowledge_id"],
             "properties": {"knowledge_id": {"type": "string", "minLength": 1},
                            "prompt_template": {"type": "string", "maxLength": 8000,
                                                "description": "{{knowledge}} and {{question}} are filled in"}},
         }}}},
    ]})

    type: Text = Field(
        min_length=1, max_length=MAX_TOOL_NAME_CHARS, description='"function" or a built-in tool'
    )
    function: FunctionDefinition | None = Field(None, description='Required when type is "function"')

    @model_validator(mode="before")
    @classmethod
    def _bounded_depth(cls, data: Any) -> Any:
        return plain_json(data)

    @model_validator(mode="after")
    def _function_tools_define_one(self) -> Tool:
        if self.type == "function" and self.function is None:
            raise ValueError('a tool of type "function" needs its "function" definition')
        return self


class FunctionName(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    """Force a call of this function: OpenAI's `{"type": "function", "function": {"name": ...}}`, or the
    platform doc's `{"name": ...}`."""

    type: Literal["function"] = "function"
    function: FunctionName | None = None
    name: str | None = Field(None, min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=FUNCTION_NAME)

    @model_validator(mode="after")
    def _one_name(self) -> NamedToolChoice:
        if (self.function is None) == (self.name is None):
            raise ValueError('name the function once: {"type": "function", "function": {"name": ...}}')
        return self

    @property
    def function_name(self) -> str:
        return self.function.name if self.function is not None else str(self.name)


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=FUNCTION_NAME)
    description: Text | None = None
    # `schema` shadows a BaseModel attribute, hence the alias
    json_schema: JsonObject = Field(alias="schema", description="The JSON Schema the reply must follow")
    strict: bool | None = Field(None, description="Accepted; the reply always follows the schema")


class ResponseFormat(BaseModel):
    """`{"type": "json_object"}` (platform): the reply is a JSON object. `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}` (OpenAI): it follows the schema. Enforced by constrained
    decoding, not by asking nicely."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
    })

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": {...}}')
        return self

    def engine_form(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        assert self.json_schema is not None
        spec = self.json_schema
        return {"type": "json_schema", "json_schema": {"name": spec.name, "schema": spec.json_schema,
                                                       "strict": spec.strict}}


class Thinking(BaseModel):
    """GLM-4.5+'s switch: "enabled" lets a thinking model reason first (returned as `reasoning_content`),
    "disabled" asks it not to. Models without thinking ignore it."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["enabled", "disabled"] = "enabled"


class PersonaMeta(BaseModel):
    """charglm-3 / emohaa (spec §2.2.3): who the bot plays and who the user is."""

    model_config = ConfigDict(extra="ignore")

    user_info: Text = Field(max_length=MAX_PERSONA_CHARS)
    bot_info: Text = Field(max_length=MAX_PERSONA_CHARS)
    bot_name: Text = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)
    user_name: Text = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS)


# ---- what a reply carries --------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string, as the model wrote them")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    index: int
    function: FunctionCall


class FunctionCallChunk(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallChunk(BaseModel):
    """A piece of a streamed call: the first piece of call `index` has id, type and name; later pieces add
    to its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallChunk
