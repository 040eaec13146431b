"""The plain generation loop: one sequence, a dense KV cache, prefill then token-by-token decode.

This is the reference path the batched serving engine is tested against; `model.chat` runs on the engine
(classic.LocalEngine) and falls back to this loop only for what the engine cannot run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from glmstack.engine.kv_cache import DenseKVCache
from glmstack.engine.sampling import StopStringMatcher, make_generator, sample_token
from glmstack.protocol import GenerationEvent, SamplingParams, Usage

if TYPE_CHECKING:
    from glmstack.engine.tokenization.base import Tokenizer

PREFILL_CHUNK = 512  # bounds the attention matrix of a long prompt


def new_cache(model: nn.Module, device: torch.device, dtype: torch.dtype, capacity: int) -> DenseKVCache:
    cfg = model.config
    return DenseKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device,
                        capacity=capacity)


@torch.inference_mode()
def prefill(model: nn.Module, ids: Sequence[int], cache: DenseKVCache, device: torch.device) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last position's logits [V].

    A model whose prompt attends bidirectionally (ChatGLM-6B's prefix) sets `prefill_chunk = None` and gets
    the whole prompt in one forward."""
    logits = None
    step = getattr(model, "prefill_chunk", PREFILL_CHUNK) or len(ids)
    for start in range(0, len(ids), step):
        chunk = torch.tensor([list(ids[start : start + step])], device=device)
        pos = torch.arange(cache.length, cache.length + chunk.shape[1], device=device)[None]
        logits = model(chunk, pos, cache, last_only=True)
    assert logits is not None
    return logits[0, -1]


@torch.inference_mode()
def generate_stream(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    context_length: int,
    stop_token_ids: set[int] | frozenset[int] = frozenset(),
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[GenerationEvent]:
    """Yields text deltas as they become safe to show, then a final event with the finish reason.

    Stops on: a stop id (not shown), a stop string (cut before it), `max_tokens`, or the end of the context.
    """
    if not prompt_ids:
        raise ValueError("empty prompt")
    room = context_length - len(prompt_ids)
    if room < 1:
        from glmstack.engine.errors import ContextLengthError

        raise ContextLengthError(len(prompt_ids), context_length)
    budget = min(params.max_tokens or room, room)
    stops = set(stop_token_ids) | set(params.stop_token_ids)
    started = time.perf_counter()
    cache = new_cache(model, device, dtype, len(prompt_ids) + min(budget, 512))
    generator = make_generator(params, device)
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    matcher = StopStringMatcher(params.stop)
    usage = Usage(prompt_tokens=len(prompt_ids))
    first_token_at: float | None = None

    logits = prefill(model, prompt_ids, cache, device)
    finish, stopped_by_string = "length", False
    while usage.completion_tokens < budget:
        token = sample_token(logits, params, generator)
        if first_token_at is None:
            first_token_at = time.perf_counter() - started
        if token in stops:
            finish = "stop"
            break
        usage.completion_tokens += 1
        text, stopped = matcher.push(decoder.push(token))
        if stopped:
            yield GenerationEvent(text, [token], usage=usage, time_to_first_token=first_token_at)
            finish, stopped_by_string = "stop", True
            break
        yield GenerationEvent(text, [token], usage=usage, time_to_first_token=first_token_at)
        if usage.completion_tokens >= budget:
            break
        step = torch.tensor([[token]], device=device)
        pos = torch.tensor([[cache.length]], device=device)
        logits = model(step, pos, cache, last_only=True)[0, -1]
    tail = ""
    if not stopped_by_string:
        tail, stopped = matcher.push(decoder.flush())
        tail += "" if stopped else matcher.flush()
    yield GenerationEvent(tail, [], finish_reason=finish, usage=usage, time_to_first_token=first_token_at)
