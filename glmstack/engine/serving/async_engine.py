"""The engine as the platform sees it: submit a `GenerateRequest`, await `GenerationEvent`s, abort any time.

The model runs on one background thread (torch releases the GIL inside kernels, so the event loop stays
responsive); events cross to the asyncio side through `loop.call_soon_threadsafe`. An abort — a client that
hung up — is noticed by the worker before its next step, and everything the request held is released.

Models the paged engine supports run through `EngineCore` (continuous batching, prefix reuse); the few that
cannot (ChatGLM-6B's bidirectional prefix) are served one request at a time by the reference loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import llguidance

from glmstack.engine import openmp
from glmstack.engine.chat_format.base import ReplyParser
from glmstack.engine.classic import DEFAULT_REPLY_RESERVE, ChatModel
from glmstack.engine.serving.core import EngineCore, RequestTooLargeError
from glmstack.protocol import (
    EngineOverloadedError,
    EngineRequestError,
    GenerateRequest,
    GenerationEvent,
    ModelInfo,
    PromptTooLongError,
)

log = logging.getLogger(__name__)
_DONE = object()


@dataclass
class _Job:
    request: GenerateRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    aborted: threading.Event = field(default_factory=threading.Event)
    grammar: llguidance.LLMatcher | None = None  # compiled before the job is queued


class AsyncEngine:
    def __init__(self, model: ChatModel, *, max_waiting: int = 256, batched: bool | None = None,
                 **core_options: Any) -> None:
        self.model = model
        self.max_waiting = max_waiting
        self._inbox: queue.Queue[_Job | None] = queue.Queue()
        # set when an interactive request is queued: a step of background (batch) rows stops early for it
        self._interactive_arrived = threading.Event()
        self._jobs: dict[str, _Job] = {}
        # Guards _jobs and _running only, for moments. The core is the worker thread's alone, and is never
        # locked: a lock held across a step (hundreds of milliseconds of prefill) would stall the event loop
        # on every request that starts or ends, and starve readers of stats().
        self._lock = threading.Lock()
        self._running: str | None = None
        self._ids = itertools.count()
        if batched is None:
            batched = getattr(model.module, "supports_paged", True)
        self.core = EngineCore(model, **core_options) if batched else None
        self._core_stats = self.core.stats() if self.core is not None else {}  # as of the last step
        target = self._work_batched if self.core is not None else self._work
        self._thread = threading.Thread(target=target, name="glmstack-engine", daemon=True)
        openmp.release_thread_pool()  # the engine thread's OpenMP team becomes the only one (see openmp.py)
        self._thread.start()

    # ---- what the platform calls -----------------------------------------------------------------------

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(name=m.name, architecture=type(m.module).__name__, context_length=m.context_length,
                         device=str(m.device), dtype=str(m.dtype).removeprefix("torch."),
                         quantization=getattr(m.module, "quantization", None),
                         generation_defaults=m.generation_defaults)

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        return len(self.model.chat_format.render(messages).token_ids)

    def stats(self) -> dict[str, int]:
        """Queue and KV figures for /metrics and the tests: requests known to the engine, by state. The core's
        figures are those after its last step: this never waits for the step in progress."""
        with self._lock:
            known, running = len(self._jobs), int(self._running is not None)
        if self.core is None:
            return {"waiting": known - running, "running": running}
        core = self._core_stats
        return {**core, "waiting": max(0, known - core["running"])}

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Stream events for `request`. Cancelling the consumer (client disconnect) aborts the request.

        A `response_format` or tool grammar is compiled here, before anything is queued, so a schema the
        compiler refuses raises InvalidConstraintError at once (and a slow compile runs on a thread, not
        on the event loop). The one-request-at-a-time path (ChatGLM-6B) decodes without constraints."""
        if request.adapter is not None and (self.core is None or self.model.adapters.get(request.adapter) is None):
            raise EngineRequestError(f"no adapter named {request.adapter!r} is loaded" if self.core is not None
                                     else f"{self.model.name} runs one request at a time, without adapters")
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        if self.core is not None and _constrained(request):
            job.grammar = await asyncio.to_thread(
                self.core.constraints.matcher_for, tools=request.tools, tool_choice=request.tool_choice,
                response_format=request.response_format, parallel=request.parallel_tool_calls)
        with self._lock:
            if len(self._jobs) >= self.max_waiting:
                raise EngineOverloadedError(f"engine queue is full ({self.max_waiting} requests)")
            if request.request_id in self._jobs:
                request.request_id = f"{request.request_id}-{next(self._ids)}"
            self._jobs[request.request_id] = job
        self._inbox.put(job)
        if not request.background:
            self._interactive_arrived.set()  # a step of batch rows in progress gives way (core.step)
        try:
            while True:
                item = await job.events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.aborted.set()  # no-op after a normal finish; frees the slot after a disconnect
            with self._lock:
                self._jobs.pop(request.request_id, None)

    # ---- adapters (protocol.AdapterHost): loaded on the caller's thread, served from the next admission ----

    def load_adapter(self, name: str, path: str) -> None:
        try:
            self.model.adapters.load(name, path)
        except (ValueError, OSError) as exc:
            raise EngineRequestError(f"adapter {name!r}: {exc}") from exc

    def unload_adapter(self, name: str) -> bool:
        return self.model.adapters.unload(name)

    def adapters(self) -> list[str]:
        return self.model.adapters.names() if self.core is not None else []

    async def abort(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            job.aborted.set()

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=5)

    # ---- the worker thread: batched ---------------------------------------------------------------------

    def _work_batched(self) -> None:
        assert self.core is not None
        active: dict[str, _Job] = {}
        while True:
            # Block only when idle; otherwise take whatever arrived and keep stepping. The flag is cleared
            # before the inbox is read: a request put after this read sets it again.
            self._interactive_arrived.clear()
            try:
                job = self._inbox.get(block=not self.core.has_work())
                while True:
                    if job is None:
                        return
                    self._admit(job, active)
                    job = self._inbox.get_nowait()
            except queue.Empty:
                pass
            for request_id, job in list(active.items()):
                if job.aborted.is_set():
                    log.info("request %s aborted", request_id)
                    self.core.abort(request_id)
                    del active[request_id]
                    self._send(job, _DONE)
            self._core_stats = self.core.stats()
            if not self.core.has_work():
                continue
            try:
                events = self.core.step(lambda rid: rid in active and active[rid].aborted.is_set(),
                                        self._interactive_arrived.is_set)
            except Exception as exc:  # a bug must not kill the worker: fail every request in flight
                log.exception("engine step failed")
                for request_id, job in list(active.items()):
                    self.core.abort(request_id)
                    self._send(job, exc)
                    self._send(job, _DONE)
                active.clear()
                continue
            finally:
                self._core_stats = self.core.stats()
            deliveries: list[tuple[_Job, object]] = []
            for request_id, event in events:
                job = active.get(request_id)
                if job is None:
                    continue
                deliveries.append((job, event))
                if event.finish_reason is not None:
                    del active[request_id]
                    deliveries.append((job, _DONE))
            self._send_many(deliveries)

    def _admit(self, job: _Job, active: dict[str, _Job]) -> None:
        assert self.core is not None
        req = job.request
        if job.aborted.is_set():
            self._send(job, _DONE)
            return
        try:
            if req.messages is not None:
                reserve = min(req.params.max_tokens or DEFAULT_REPLY_RESERVE, self.model.context_length // 4)
                prompt_ids, _ = self.model.render_chat(req.messages, reserve, tools=req.tools,
                                                       thinking=req.thinking)
            elif req.prompt_ids is not None:
                prompt_ids = list(req.prompt_ids)
            else:
                raise ValueError("request has neither messages nor prompt_ids")
            self.core.add_request(req.request_id, prompt_ids, req.params, grammar=job.grammar,
                                  reply_parser=self._reply_parser(req), background=req.background,
                                  adapter=req.adapter)
        except RequestTooLargeError as exc:
            self._send(job, PromptTooLongError(str(exc)))
            self._send(job, _DONE)
            return
        except Exception as exc:
            self._send(job, exc)
            self._send(job, _DONE)
            return
        active[req.request_id] = job

    # ---- the worker thread: one request at a time --------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._inbox.get()
            if job is None:
                return
            if job.aborted.is_set():
                continue
            with self._lock:
                self._running = job.request.request_id
            try:
                self._run(job)
            except BaseException as exc:  # delivered to the awaiting coroutine, never kills the worker
                self._send(job, exc)
            finally:
                with self._lock:
                    self._running = None
            self._send(job, _DONE)

    def _run(self, job: _Job) -> None:
        req = job.request
        if req.messages is not None:
            events = self.model.stream_messages(req.messages, req.params, tools=req.tools, thinking=req.thinking)
        elif req.prompt_ids is not None:
            events = self.model.stream_generate(req.prompt_ids, req.params)
        else:
            raise ValueError("request has neither messages nor prompt_ids")
        for event in _parsed(events, self._reply_parser(req)):
            if job.aborted.is_set():
                log.info("request %s aborted", req.request_id)
                return
            self._send(job, event)

    def _reply_parser(self, req: GenerateRequest) -> ReplyParser:
        tools = req.tools if req.tool_choice != "none" else None
        return self.model.chat_format.reply_parser(tools=tools or None, thinking=req.thinking)

    @classmethod
    def _send_many(cls, deliveries: list[tuple[_Job, object]]) -> None:
        """A step's events, with one wake-up per event loop rather than one per event: each wake-up runs the
        loop on a core the step's kernels are using, and the engine thread then waits for the GIL."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, object]]] = {}
        for job, item in deliveries:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(cls._deliver, items)
            except RuntimeError:  # the event loop is gone (server shutting down)
                for job, _ in items:
                    job.aborted.set()

    @staticmethod
    def _deliver(items: list[tuple[_Job, object]]) -> None:
        for job, item in items:
            job.events.put_nowait(item)

    @classmethod
    def _send(cls, job: _Job, item: object) -> None:
        cls._send_many([(job, item)])


def _constrained(request: GenerateRequest) -> bool:
    """Whether `request` may need a grammar (Constraints.matcher_for decides which)."""
    fmt = request.response_format
    return bool(request.tools and request.tool_choice != "none") or (
        fmt is not None and fmt.get("type") not in (None, "text"))


def _parsed(events: Iterator[GenerationEvent], parser: ReplyParser) -> Iterator[GenerationEvent]:
    """The reference loop's events with their text split by the reply parser, as EngineCore splits its own."""
    for event in events:
        delta = parser.push(event.text) if event.text else None
        if event.finish_reason is not None:
            tail = parser.finish()
            content = (delta.content if delta else "") + tail.content
            reasoning = (delta.reasoning if delta else "") + tail.reasoning
            calls = (delta.tool_calls if delta else []) + tail.tool_calls
            finish = "tool_calls" if event.finish_reason == "stop" and parser.calls > 0 else event.finish_reason
            yield dataclasses.replace(event, text=content, reasoning=reasoning, tool_calls=calls,
                                      finish_reason=finish)
        elif delta is not None:
            yield dataclasses.replace(event, text=delta.content, reasoning=delta.reasoning,
                                      tool_calls=delta.tool_calls)
        else:
            yield event
