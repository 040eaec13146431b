"""One request body run in the background, as the endpoint would answer it: (HTTP status, response body).

Batch lines and async tasks both come through here. A body is validated with the endpoint's own schema, and
every refusal becomes the error envelope the endpoint would have sent (so an error file line reads like the
HTTP error a client knows). The engine sees the request as background work (`GenerateRequest.background`).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, cast

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from glmstack.api import errors
from glmstack.api.auth import Caller
from glmstack.api.deps import Platform
from glmstack.api.errors import PlatformError
from glmstack.api.schemas.chat import ChatCompletion, ChatCompletionRequest, Choice, Usage
from glmstack.api.schemas.embeddings import EmbeddingRequest
from glmstack.api.services import chat, embeddings, retrieval
from glmstack.api.services.generation import Generation
from glmstack.protocol import EngineRequestError
from glmstack.store.errors import StoreUnavailableError

log = logging.getLogger(__name__)

Result = tuple[int, dict[str, Any]]


def new_completion_id() -> str:
    return str(secrets.randbits(63))


def caller_for(key_id: str | None) -> Caller:
    """The key a job was created with (checked then; a job keeps running if the key is revoked later, as a
    request in flight would)."""
    return Caller(key_id=key_id, concurrency_limit=None, scheme="key" if key_id else "open")


def error_result(error: PlatformError) -> Result:
    return error.http_status, error.body()


async def run_chat(platform: Platform, caller: Caller, body: dict[str, Any], *,
                   request_id: str | None = None) -> Result:
    try:
        request = ChatCompletionRequest.model_validate(body)
        if request.stream:
            raise PlatformError(1214, "stream cannot be true here: the result is collected", field="stream")
        completion = await complete(platform, caller, request, request_id=request_id)
    except ValidationError as e:
        return error_result(errors.from_validation(RequestValidationError(e.errors())))
    except PlatformError as e:
        return error_result(e)
    except EngineRequestError as e:
        return error_result(errors.from_engine(e))
    except StoreUnavailableError:
        raise  # not the request's fault: the job stops and is taken up again
    return 200, completion.model_dump(mode="json", exclude_none=True)


async def complete(platform: Platform, caller: Caller, request: ChatCompletionRequest, *,
                   request_id: str | None) -> ChatCompletion:
    """chat.complete without a client connection: the same preparation, as background work."""
    completion_id = new_completion_id()
    platform.models.resolve(request.model, caller.key_id)
    grounding = await retrieval.ground(platform, caller, request)
    generate = chat.prepare(platform, caller, request, completion_id, grounding)
    generate.background = True
    generation = Generation(platform, caller, generate, {})
    try:
        reply = await chat.collect(generation)
    finally:
        await generation.close()
    if reply.finish_reason == "sensitive":
        raise chat.output_blocked()
    if reply.finish_reason == "network_error":  # the engine failed mid-way: an error, not a short answer
        raise PlatformError(1234, error_id=completion_id)
    return ChatCompletion(
        id=completion_id, created=int(time.time()), model=request.model,
        request_id=request.request_id or request_id or completion_id,
        choices=[Choice(finish_reason=cast(Any, reply.finish_reason), message=reply.message())],
        usage=Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                    total_tokens=generation.prompt_tokens + generation.completion_tokens),
        retrieval=grounding.references() if grounding else None,
    )


async def run_embeddings(platform: Platform, caller: Caller, body: dict[str, Any]) -> Result:
    try:
        request = EmbeddingRequest.model_validate(body)
        result = await embeddings.create(platform, caller, request, background=True)
    except ValidationError as e:
        return error_result(errors.from_validation(RequestValidationError(e.errors())))
    except PlatformError as e:
        return error_result(e)
    return 200, result.model_dump(mode="json", exclude_none=True)
