"""A scripted engine and request helpers for the in-process HTTP tests."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.testclient import TestClient

from glmstack.protocol import GenerateRequest, GenerationDefaults, GenerationEvent, ModelInfo, Usage
from glmstack.store import Store, UsageRow

CHAT = "/api/paas/v4/chat/completions"


class ScriptedEngine:
    """Replies with `reply`, word by word (or, when `events` is set, with exactly those events: tool-call
    pieces, reasoning, the finish reason); `gate` (an asyncio.Event) holds every generation until set;
    `error` is raised before the first event, `fail_after` after that many words."""

    def __init__(self) -> None:
        self.reply = ["Hello", " there", "!"]
        self.finish = "stop"
        self.error: Exception | None = None
        self.fail_after: int | None = None
        self.gate: asyncio.Event | None = None
        self.events: list[GenerationEvent] | None = None
        self.requests: list[GenerateRequest] = []
        self.active = 0
        self.generation_defaults = GenerationDefaults()

    def info(self) -> ModelInfo:
        return ModelInfo("scripted-1b", "Scripted", 4096, "cpu", "float32",
                         generation_defaults=self.generation_defaults)

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        return sum(len(m["content"].split()) for m in messages) + 3

    def stats(self) -> dict[str, int]:
        return {"waiting": 0, "running": self.active, "kv_blocks_in_use": 2 * self.active}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        self.active += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            usage = Usage(prompt_tokens=self.count_prompt_tokens(request.messages or []))
            if self.events is not None:
                for scripted in self.events:
                    usage.completion_tokens += 1
                    yield dataclasses.replace(scripted, usage=usage)
                return
            for i, word in enumerate(self.reply):
                if i == self.fail_after:
                    raise RuntimeError("the GPU caught fire")
                usage.completion_tokens += 1
                yield GenerationEvent(word, [1], usage=usage, time_to_first_token=0.01)
            yield GenerationEvent("", [], finish_reason=self.finish, usage=usage)
        finally:
            self.active -= 1

    async def abort(self, request_id: str) -> None:
        pass


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "glm-4", "messages": [{"role": "user", "content": "hi"}], **extra}


def error_of(response: httpx.Response) -> tuple[int, str]:
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    return response.status_code, body["error"]["code"]


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


def client_ok(c: TestClient, body: dict[str, Any]) -> bool:
    return c.post(CHAT, json=body).status_code == 200


def written_usage(store: Store, *clients: TestClient) -> list[UsageRow]:
    """The usage report once the clients' apps have written what they served (usage is written behind the
    replies)."""
    for c in clients:
        assert c.app.state.platform.usage.flush(timeout=10)
    return store.usage.report()
