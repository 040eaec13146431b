"""ChatGLM's classic api.py contract: prompt + history in, response + history out, `max_length` counting
prompt and reply together."""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import Receive

from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.disconnect import unless_disconnected
from glmstack.api.errors import PlatformError
from glmstack.api.safety import LEVEL
from glmstack.api.schemas.classic import ClassicRequest, ClassicResponse
from glmstack.api.services.chat import MIN_TEMPERATURE, MIN_TOP_P, collect
from glmstack.api.services.generation import Generation
from glmstack.api.shutdown import deadline_error
from glmstack.protocol import GenerateRequest, SamplingParams

# api.py's defaults
DEFAULT_MAX_LENGTH = 2048
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


def _pair(turn: Any) -> tuple[str, str] | None:
    if isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(x, str) for x in turn):
        return turn[0], turn[1]
    return None


def history_messages(history: list[Any]) -> tuple[list[dict[str, str]], bool]:
    """(messages, pair_style). Pairs are ChatGLM-6B/2 history; role dicts are ChatGLM3's."""
    if all(_pair(turn) is not None for turn in history):
        messages = []
        for query, response in (_pair(turn) for turn in history):  # type: ignore[misc]
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return messages, True
    if all(
        isinstance(t, dict)
        and t.get("role") in ("system", "user", "assistant")
        and isinstance(t.get("content"), str)
        for t in history
    ):
        return [{"role": t["role"], "content": t["content"]} for t in history], False
    raise PlatformError(
        1214, "history must be [[query, response], ...] or [{role, content}, ...]", field="history"
    )


async def answer(
    platform: Platform,
    caller: Caller,
    body: ClassicRequest,
    request_id: str,
    receive: Receive,
    log_fields: dict[str, Any],
) -> ClassicResponse:
    history = body.history or []
    if len(history) * 2 + 1 > platform.settings.max_messages:
        raise PlatformError(1214, f"at most {platform.settings.max_messages} messages", field="history")
    past, pair_style = history_messages(history)
    messages = past + [{"role": "user", "content": body.prompt}]
    platform.safety.check_input(messages)
    prompt_tokens = await run_in_threadpool(platform.engine.count_prompt_tokens, messages)
    # A limit beyond the context is no limit at all: clamped, as ChatGLM's demos send 8192 or 32768 whatever
    # the model.
    max_length = min(body.max_length or DEFAULT_MAX_LENGTH, platform.engine.info().context_length)
    if prompt_tokens >= max_length:
        raise PlatformError(1261, f"the prompt is {prompt_tokens} tokens, not below max_length={max_length}")
    max_tokens = max_length - prompt_tokens
    if platform.settings.max_tokens_cap is not None:
        max_tokens = min(max_tokens, platform.settings.max_tokens_cap)
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    params = SamplingParams(
        max_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=max(temperature, MIN_TEMPERATURE) if temperature > 0 else temperature,
        top_p=max(DEFAULT_TOP_P if body.top_p is None else body.top_p, MIN_TOP_P),
    )

    generation = Generation(
        platform, caller, GenerateRequest(request_id, params, messages=messages), log_fields
    )
    try:
        reply = await unless_disconnected(receive, collect(generation))
    finally:
        await generation.close()
    if generation.cut_at_deadline:
        raise deadline_error(request_id)
    text = "".join(reply.content)
    if reply.finish_reason == "sensitive":
        raise PlatformError(1301, extra={"contentFilter": [{"level": LEVEL, "role": "assistant"}]})
    turn: Any = (
        [body.prompt, text]
        if pair_style
        else [{"role": "user", "content": body.prompt}, {"role": "assistant", "content": text}]
    )
    new_history = [*history, turn] if pair_style else [*history, *turn]
    return ClassicResponse(response=text, history=new_history, time=time.strftime("%Y-%m-%d %H:%M:%S"))
