"""Chat completions: from a validated ChatCompletionRequest to an engine request, and from engine steps to
the documented response or stream (spec §2.1, §1.10–1.12)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Receive

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.disconnect import unless_disconnected
from glmstack.api.errors import PlatformError
from glmstack.api.safety import LEVEL
from glmstack.api.schemas.chat import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    Message,
    Usage,
)
from glmstack.api.schemas.models import GenerationDefaultsCard
from glmstack.api.schemas.tools import FunctionCall, NamedToolChoice, ToolCall
from glmstack.api.services import retrieval
from glmstack.api.services.generation import Generation, Step
from glmstack.api.services.personas import is_persona_model, persona_messages
from glmstack.api.services.retrieval import Grounding
from glmstack.api.shutdown import deadline_error
from glmstack.api.sse import DONE, EventStreamResponse, event
from glmstack.protocol import GenerateRequest, GenerationDefaults, SamplingParams, ToolCallDelta

# The doc's defaults for the GLM-4 series, for what neither the request nor the served model's own
# recommendation (ModelInfo.generation_defaults) says.
DEFAULT_MAX_TOKENS = 1024
DEFAULT_TEMPERATURE = 0.95
DEFAULT_TOP_P = 0.7
# The engine's sampler needs top_p > 0, and a temperature far below this one divides logits into inf and
# NaN (which fails the whole batch's step); the SDKs clamp both the same way (sdk-wire §2).
MIN_TOP_P = 0.01
MIN_TEMPERATURE = 0.01


def engine_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as the engine's chat formats read them: text content, tool fields only where present."""
    rendered = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise PlatformError(1214, "this model reads text only", field=f"messages[{i}].content")
            content = "".join(part.text or "" for part in content)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise PlatformError(1213, f"{m.role} messages need content", field=f"messages[{i}].content")
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        rendered.append(message)
    return rendered


def sampling_params(body: ChatCompletionRequest, max_tokens_cap: int,
                    defaults: GenerationDefaults | None = None) -> SamplingParams:
    """`max_tokens_cap`: the model's context length, or the configured cap when that is lower. `defaults`: the
    served model's recommendation, for what the request leaves out."""
    defaults = defaults or GenerationDefaults()
    max_tokens = body.max_tokens or min(defaults.max_tokens or DEFAULT_MAX_TOKENS, max_tokens_cap)
    if max_tokens > max_tokens_cap:
        raise PlatformError(1214, f"max_tokens may be at most {max_tokens_cap}", field="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise PlatformError(
            1214,
            f"up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters",
            field="stop",
        )
    temperature = _first(body.temperature, defaults.temperature, DEFAULT_TEMPERATURE)
    top_p = max(_first(body.top_p, defaults.top_p, DEFAULT_TOP_P), MIN_TOP_P)
    do_sample = body.do_sample is not False and temperature > 0
    temperature = max(temperature, MIN_TEMPERATURE) if do_sample else temperature
    return SamplingParams(
        max_tokens=max_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=body.seed,
    )


def effective_defaults(platform: Platform) -> GenerationDefaultsCard:
    """What a request that leaves out temperature, top_p and max_tokens gets (shown by GET /models)."""
    info = platform.engine.info()
    own = info.generation_defaults
    cap = min(info.context_length, platform.settings.max_tokens_cap or info.context_length)
    return GenerationDefaultsCard(
        temperature=_first(own.temperature, DEFAULT_TEMPERATURE), top_p=_first(own.top_p, DEFAULT_TOP_P),
        max_tokens=min(own.max_tokens or DEFAULT_MAX_TOKENS, cap), source=own.source or "platform",
    )


def _first(*values: float | None) -> float:
    return next(v for v in values if v is not None)


def engine_tools(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, str | dict | None]:
    """The tools the model is shown and the engine's tool_choice. "none" shows none (as the official GLM-4
    server does); a named function must be one of the tools. Tool types the chat model cannot call
    (`retrieval`, `web_search`) are not passed to it."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise PlatformError(1214, "tool_choice asks for a tool call but no tools were given",
                                field="tool_choice")
        return None, None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools
             if tool.type not in ("retrieval", "web_search")]
    names = {tool["function"]["name"] for tool in tools if tool["type"] == "function"}
    if isinstance(choice, NamedToolChoice):
        if choice.function_name not in names:
            raise PlatformError(1214, f"tool_choice names {choice.function_name!r}, which is not among the "
                                      "function tools", field="tool_choice")
        return tools or None, {"type": "function", "function": {"name": choice.function_name}}
    if choice == "required" and not names:
        raise PlatformError(1214, 'tool_choice "required" needs a function tool', field="tool_choice")
    return tools or None, choice or "auto"


def prepare(platform: Platform, caller: Caller, body: ChatCompletionRequest, completion_id: str,
            grounding: Grounding | None = None) -> GenerateRequest:
    """Everything that can be refused before the engine is involved: model (1211), parameters (1213/1214),
    input content (1301). `grounding`: what the retrieval tool found, put into the messages."""
    platform.models.resolve(body.model, caller.key_id)
    if len(body.messages) > platform.settings.max_messages:
        raise PlatformError(1214, f"at most {platform.settings.max_messages} messages", field="messages")
    messages = engine_messages(body.messages)
    if grounding is not None:
        messages = grounding.apply(messages)
    if is_persona_model(body.model):
        messages = persona_messages(body.model, body.meta, messages)
    info = platform.engine.info()
    cap = min(info.context_length, platform.settings.max_tokens_cap or info.context_length)
    params = sampling_params(body, cap, info.generation_defaults)
    platform.safety.check_input(messages)
    tools, tool_choice = engine_tools(body)
    thinking = None if body.thinking is None else body.thinking.type == "enabled"
    response_format = body.response_format.engine_form() if body.response_format is not None else None
    return GenerateRequest(completion_id, params, messages=messages, tools=tools, tool_choice=tool_choice,
                           parallel_tool_calls=body.parallel_tool_calls is not False,
                           response_format=response_format, thinking=thinking,
                           adapter=platform.models.adapter_for(body.model, caller.key_id))


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def output_blocked() -> PlatformError:
    # Synchronous calls: the doc answers a flagged output with 1301 and no result (spec §1.10, §9 item 30).
    return PlatformError(1301, extra={"contentFilter": [{"level": LEVEL, "role": "assistant"}]})


class Reply:
    """A whole reply gathered from its steps: content, reasoning, tool calls (pieces joined by index)."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, ToolCall] = {}
        self.finish_reason = "network_error"

    def add(self, step: Step) -> None:
        self.content.append(step.text)
        self.reasoning.append(step.reasoning)
        for piece in step.tool_calls:
            call = self.calls.get(piece.index)
            if call is None:
                call = self.calls[piece.index] = ToolCall(
                    id=piece.id or f"call_{piece.index}", index=piece.index,
                    function=FunctionCall(name=piece.name or "", arguments=""))
            call.function.arguments += piece.arguments
        if step.finish_reason is not None:
            self.finish_reason = step.finish_reason

    def message(self) -> AssistantMessage:
        content = "".join(self.content)
        reasoning = "".join(self.reasoning)
        calls = [self.calls[i] for i in sorted(self.calls)]
        # spec §2.1: content is null when the model called a function
        return AssistantMessage(content=None if calls and not content.strip() else content,
                                reasoning_content=reasoning or None, tool_calls=calls or None)


async def collect(generation: Generation) -> Reply:
    """Runs a generation to its end."""
    reply = Reply()
    async for step in generation.steps():
        reply.add(step)
    return reply


async def complete(
    platform: Platform,
    caller: Caller,
    body: ChatCompletionRequest,
    completion_id: str,
    receive: Receive,
    log_fields: dict[str, Any],
) -> ChatCompletion:
    platform.models.resolve(body.model, caller.key_id)  # an unknown model is refused before any retrieval work
    grounding = await retrieval.ground(platform, caller, body)
    request = prepare(platform, caller, body, completion_id, grounding)
    generation = Generation(platform, caller, request, log_fields)
    try:
        reply = await unless_disconnected(receive, collect(generation))
    finally:
        await generation.close()
    if generation.cut_at_deadline:  # nothing has been sent yet, so this can still be an HTTP error (500)
        raise deadline_error(completion_id)
    if reply.finish_reason == "sensitive":
        raise output_blocked()
    return ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=body.model,
        request_id=body.request_id or completion_id,
        choices=[Choice(finish_reason=reply.finish_reason, message=reply.message())],
        usage=Usage(**_usage(generation)),
        retrieval=grounding.references() if grounding else None,
    )


async def stream(
    platform: Platform,
    caller: Caller,
    body: ChatCompletionRequest,
    completion_id: str,
    receive: Receive,
    log_fields: dict[str, Any],
) -> EventStreamResponse:
    """The SSE response. The first step is awaited before the response starts, so that refusals the
    engine makes at admission (prompt too long, overloaded) are still ordinary HTTP errors."""
    platform.models.resolve(body.model, caller.key_id)
    grounding = await retrieval.ground(platform, caller, body)
    request = prepare(platform, caller, body, completion_id, grounding)
    generation = Generation(platform, caller, request, log_fields)
    steps = generation.steps()
    try:
        first = await unless_disconnected(receive, anext(steps, None))
    except BaseException:
        await generation.close()
        raise
    if generation.cut_at_deadline:  # still queued at the shutdown deadline: an HTTP error, nothing sent yet
        await generation.close()
        raise deadline_error(completion_id)
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.model,
    }
    references = grounding.references() if grounding else None
    return EventStreamResponse(_chunks(base, first, steps, generation, references), on_close=generation.close)


def _call_chunk(piece: ToolCallDelta) -> dict[str, Any]:
    """OpenAI's streamed call: the first piece has id, type and name; later pieces add arguments."""
    chunk: dict[str, Any] = {"index": piece.index}
    function: dict[str, str] = {"arguments": piece.arguments}
    if piece.id is not None:
        chunk["id"], chunk["type"] = piece.id, "function"
    if piece.name is not None:
        function["name"] = piece.name
    chunk["function"] = function
    return chunk


def _delta(step: Step) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant"}
    if step.text or not (step.reasoning or step.tool_calls):
        delta["content"] = step.text
    if step.reasoning:
        delta["reasoning_content"] = step.reasoning
    if step.tool_calls:
        delta["tool_calls"] = [_call_chunk(piece) for piece in step.tool_calls]
    return delta


async def _chunks(
    base: dict[str, Any], step: Step | None, steps: AsyncIterator[Step], generation: Generation,
    references: list[dict[str, Any]] | None = None,
) -> AsyncIterator[bytes]:
    if references is not None:  # the first chunk says what the retrieval tool gave the model
        base = {**base, "retrieval": references}
    while step is not None:
        if step.finish_reason is None:
            yield event({**base, "choices": [{"index": 0, "delta": _delta(step)}]})
            base.pop("retrieval", None)
        else:
            last: dict[str, Any] = {
                **base,
                "choices": [{"index": 0, "finish_reason": step.finish_reason, "delta": _delta(step)}],
                "usage": _usage(generation),
            }
            if step.finish_reason == "sensitive":
                last["content_filter"] = [{"role": "assistant", "level": LEVEL}]
            if generation.cut_at_deadline:
                # The error event comes before the finish chunk: the SDKs (zhipuai, zai, openai) raise when
                # they read it (sdk-wire §4), whatever follows, and a reader that stops at the first
                # finish_reason - a common loop - would never reach an error sent after it. The finish chunk
                # still follows, for raw readers: "network_error" and the usage of what was generated.
                yield event(deadline_error(base["id"]).body())
            yield event(last)
            yield DONE
            return
        step = await anext(steps, None)
