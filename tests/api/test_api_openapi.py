"""/openapi.json is a valid OpenAPI document that tells the truth: what it allows, the server accepts; what the
server answers, it describes (issue 16). Requests generated from the document by schemathesis run against the
app with the scripted engine (the real model's run is tests/reliability/test_platform_schema.py)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from openapi_spec_validator import validate
from scripted import ScriptedEngine

from glmstack.protocol import GenerationEvent, ToolCallDelta

CASES = 150


def test_the_document_validates(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    validate(doc)
    stream = doc["paths"]["/api/paas/v4/chat/completions"]["post"]["responses"]["200"]["content"]
    assert stream["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionChunk"}
    assert "$defs" not in str(doc)
    request = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert "glm-4" in request["model"]["enum"] and "charglm-3" in request["model"]["enum"]
    assert request["max_tokens"]["anyOf"][0]["maximum"] == 4096  # the scripted model's context


def test_generated_valid_requests_are_accepted(client: TestClient, engine: ScriptedEngine) -> None:
    """Every request the document calls valid gets a 200 whose body the document describes - except the refusals
    no schema can express (a named tool_choice must name one of the request's tools; a retrieval tool must name
    a knowledge base that exists), which must say so."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation import GenerationMode

    # some replies are tool calls and reasoning, so the response schemas of those are exercised too
    engine.events = [GenerationEvent("", [1], reasoning="hm"),
                     GenerationEvent("", [1], tool_calls=[ToolCallDelta(0, "call_1", "f", "{}")]),
                     GenerationEvent("", [], finish_reason="tool_calls")]
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operation = schema["/api/paas/v4/chat/completions"]["POST"]
    refused: list[tuple[Any, str]] = []
    answered = 0

    @settings(max_examples=CASES, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def one(case: Any) -> None:
        nonlocal answered
        response = case.call(headers=dict(client.headers))
        answered += 1
        if response.status_code != 200:
            message = response.json()["error"]["message"]
            if "tool_choice" not in message and "no knowledge base" not in message:
                refused.append((case.body, message))
            return
        if not (isinstance(case.body, dict) and case.body.get("stream")):
            case.validate_response(response)

    one()
    assert answered >= CASES // 2
    assert refused == [], refused[:5]
