"""One admitted run of the engine, as both chat endpoints and the classic endpoint use it: a concurrency
slot, the output safety check, and usage accounting when it ends — however it ends (finished, stopped as
sensitive, aborted because the client hung up, or cut at the shutdown deadline)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.protocol import EngineRequestError, GenerateRequest, GenerationEvent, ToolCallDelta

log = logging.getLogger(__name__)

# engine finish reason -> platform finish_reason (spec §1.11). "abort" reaches a reader only when the engine
# gave up on its own (we stop reading when we abort), which the doc calls an inference error.
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


@dataclass
class Step:
    text: str
    finish_reason: str | None = None  # set on the last step only
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls or self.finish_reason)


class Generation:
    def __init__(
        self, platform: Platform, caller: Caller, request: GenerateRequest, log_fields: dict[str, Any]
    ) -> None:
        # 1302 / 1305 before anything runs. Background work (batch lines, async tasks) is bounded by the job
        # runner's own concurrency instead, so a running batch never uses up a key's interactive slots.
        self._lease = None if request.background else platform.limiter.acquire(caller)
        self._platform, self._caller, self._log = platform, caller, log_fields
        self._submitted = time.perf_counter()
        self._engine_seconds: float | None = None  # submit to last event: queue + prefill + decode
        self._events = platform.engine.generate(request)
        self._monitor = platform.safety.output_monitor()
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._time_to_first_token: float | None = None
        self._started = self._closed = False
        self._cut = False
        # One waiting task per generation (not a check per token): it sleeps until the shutdown deadline,
        # which never comes unless the server is draining. Background work has none: the job runner cancels
        # it at the deadline, so the line or task is run again by the next server rather than failed.
        self._deadline_watch = (None if request.background
                                else asyncio.ensure_future(self._abort_at_deadline(request)))

    @property
    def cut_at_deadline(self) -> bool:
        """The run ended because the server's shutdown deadline came first (its last step says
        "network_error"); the reply must end with error 1234 (api/shutdown.py)."""
        return self._cut and self.finish_reason == "network_error"

    async def _abort_at_deadline(self, request: GenerateRequest) -> None:
        await self._platform.drain.wait_deadline()
        if self.finish_reason is None:
            self._cut = True
            # request.request_id, read now: the engine renames a duplicate id when it queues the request
            log.warning("request %s cut at the shutdown deadline", request.request_id)
            # The engine ends the event stream (without a finish event) and frees the KV blocks; steps()
            # then ends the run with "network_error".
            await self._platform.engine.abort(request.request_id)

    async def steps(self) -> AsyncIterator[Step]:
        """Text deltas; the last step carries the finish reason. Engine refusals (prompt too long, queue
        full) raise before the first step, so they can still become HTTP errors; a failure after output
        has begun, or the shutdown deadline, ends the run with "network_error"."""
        try:
            async for event in self._events:
                if self._cut:  # the abort came before the engine had queued the request, so it missed it
                    break
                self._count(event)
                # what the model wrote, all of it: reply, reasoning and tool-call arguments
                written = event.text + event.reasoning + "".join(c.arguments for c in event.tool_calls)
                if self._monitor.push(written):
                    yield self._finish("sensitive", "")
                    return
                step = Step(event.text, None, event.reasoning, list(event.tool_calls))
                if event.finish_reason is not None:
                    step.finish_reason = self._finish(
                        FINISH_REASONS.get(event.finish_reason, "network_error"), "").finish_reason
                    yield step
                    return
                if step:
                    yield step
        except EngineRequestError:
            if not self._started:
                raise
            log.exception("engine refused a request after it had started")
        except Exception:
            log.exception("generation failed")
        yield self._finish("network_error", "")

    async def close(self) -> None:
        """Stop the engine work if it still runs, free the slot, record usage. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._deadline_watch is not None:
            self._deadline_watch.cancel()
        try:
            await self._events.aclose()  # aborts the request in the engine if it is still running
        finally:
            if self._lease is not None:
                self._lease.release()
        reason = self.finish_reason or "abort"
        served = self._platform.models.served
        self._log.update(
            model=served,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            finish_reason=reason,
        )
        if self._engine_seconds is not None:  # the access log's duration_ms minus this is the platform's share
            self._log["engine_ms"] = round(self._engine_seconds * 1000, 2)
        if not self.prompt_tokens:  # never reached the engine: nothing was computed
            return
        self._platform.metrics.record_generation(
            served, self.prompt_tokens, self.completion_tokens, reason, self._time_to_first_token
        )
        # Written behind the reply by the usage writer: a reply never waits for the database.
        self._platform.usage.add(self._caller.key_id, served, self.prompt_tokens, self.completion_tokens)

    def _count(self, event: GenerationEvent) -> None:
        self._started = True
        self.prompt_tokens = event.usage.prompt_tokens
        self.completion_tokens = event.usage.completion_tokens
        if self._time_to_first_token is None:
            self._time_to_first_token = event.time_to_first_token

    def _finish(self, reason: str, text: str) -> Step:
        self._engine_seconds = time.perf_counter() - self._submitted
        self.finish_reason = reason
        return Step(text, reason)
