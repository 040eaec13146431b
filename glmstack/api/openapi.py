"""/openapi.json as the server really behaves, so a client generated from it works and a fuzzer's "valid"
requests are accepted.

FastAPI's document is built from the pydantic models; what it cannot know is added here, per app: the model
names this server answers to, the reply cap of its model, the message count it takes, that charglm-3 and
emohaa need `meta` and take only user and assistant turns, and the stream chunk's schema (inlined by pydantic
with `#/$defs/...` references that do not resolve inside an OpenAPI document, so it goes to components like
every other model). Validation errors
answer 400 with the platform's envelope, not FastAPI's 422, so those entries go too.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from glmstack.api.deps import Platform
from glmstack.api.schemas.chat import ChatCompletionChunk
from glmstack.api.services.personas import PERSONA_MODELS

COMPONENTS = "#/components/schemas/{model}"
STREAM_MEDIA = "text/event-stream"


def install(app: FastAPI, platform: Platform) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            _add_stream_chunk(doc)
            _add_server_bounds(doc, platform)
            _drop_422(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_stream_chunk(doc: dict[str, Any]) -> None:
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    chunk = ChatCompletionChunk.model_json_schema(ref_template=COMPONENTS)
    for name, definition in chunk.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas["ChatCompletionChunk"] = chunk
    for path in doc["paths"].values():
        for operation in path.values():
            media = operation.get("responses", {}).get("200", {}).get("content", {}).get(STREAM_MEDIA)
            if media is not None:
                media["schema"] = {"$ref": COMPONENTS.format(model="ChatCompletionChunk")}


def _add_server_bounds(doc: dict[str, Any], platform: Platform) -> None:
    schemas = doc["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]
    properties = request["properties"]
    properties["model"]["enum"] = list(platform.models.names)
    properties["messages"]["maxItems"] = platform.settings.max_messages
    info = platform.engine.info()
    cap = min(info.context_length, platform.settings.max_tokens_cap or info.context_length)
    for option in properties["max_tokens"]["anyOf"]:
        if option.get("type") == "integer":
            option["maximum"] = cap
    for option in properties["seed"]["anyOf"]:
        if option.get("type") == "integer":  # as integers: a float bound of 2**63 admits 2**63 to a fuzzer
            option.pop("exclusiveMaximum", None)
            option["minimum"], option["maximum"] = -(2**63), 2**63 - 1
    request.setdefault("allOf", []).append(
        {"if": {"properties": {"model": {"enum": list(PERSONA_MODELS)}}, "required": ["model"]},
         "then": {"required": ["meta"], "properties": {
             "meta": {"type": "object"},
             "messages": {"items": {"properties": {"role": {"enum": ["user", "assistant"]}}}}}}}
    )


def _drop_422(doc: dict[str, Any]) -> None:
    for path in doc["paths"].values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
