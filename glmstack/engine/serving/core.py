"""The serving engine's step loop: requests in, token events out, one batched forward pass per step.

    scheduler.py  decides who runs and with how many tokens (continuous batching, chunked prefill)
    runner.py     runs those tokens as one batch over the paged KV cache
    core.py       (this) samples, detokenizes, applies stop strings, emits events, frees what finished

Synchronous and single-threaded on purpose: `AsyncEngine` calls `step()` from its worker thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llguidance
import torch

from glmstack.engine.chat_format.base import ContentOnly, ReplyDelta, ReplyParser
from glmstack.engine.constrained import Constraints, advance, mask_logits
from glmstack.engine.kv_cache import PagedKVCache, StepCancelled
from glmstack.engine.sampling import StopStringMatcher, is_greedy, make_generator, sample_token
from glmstack.engine.serving.block_allocator import BlockAllocator
from glmstack.engine.serving.runner import ModelRunner
from glmstack.engine.serving.scheduler import RequestTooLargeError, ScheduledChunk, Scheduler, Sequence
from glmstack.engine.serving.step_budget import DEFAULT_TARGET_SECONDS, StepBudget
from glmstack.engine.tokenization.base import StreamDecoder
from glmstack.protocol import EngineRequestError, GenerationEvent, SamplingParams, Usage
from glmstack.settings import Settings

if TYPE_CHECKING:
    from glmstack.engine.classic import ChatModel

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_MB = Settings.kv_cache_mb  # GLMSTACK_KV_CACHE_MB, passed in by `glmstack serve`
DEFAULT_BLOCK_SIZE = 16


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    decoder: StreamDecoder
    stops: StopStringMatcher
    generator: torch.Generator | None
    parser: ReplyParser = field(default_factory=ContentOnly)
    grammar: llguidance.LLMatcher | None = None  # the reply's constraint, advanced token by token
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def event(self, text: str, token_ids: list[int], finish: str | None = None) -> GenerationEvent:
        """An event for `text` (after stop strings), split by the reply parser into content, reasoning and
        tool calls; the last one (`finish` given) flushes the parser."""
        delta = self.parser.push(text) if text else ReplyDelta()
        if finish is not None:
            tail = self.parser.finish()
            delta = ReplyDelta(delta.content + tail.content, delta.reasoning + tail.reasoning,
                               delta.tool_calls + tail.tool_calls)
            if finish == "stop" and self.parser.calls > 0:
                finish = "tool_calls"
        usage = Usage(prompt_tokens=len(self.seq.prompt_ids), completion_tokens=len(self.seq.output_ids))
        return GenerationEvent(delta.content, token_ids, finish_reason=finish, usage=usage,
                               time_to_first_token=self.first_token_at, reasoning=delta.reasoning,
                               tool_calls=delta.tool_calls)

    @property
    def grammar_done(self) -> bool:
        """The constraint is complete (nothing but an end token could follow) or broken: the reply ends."""
        return self.grammar is not None and self.grammar.is_stopped()


class EngineCore:
    def __init__(
        self,
        model: ChatModel,
        *,
        kv_cache_bytes: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_batch_tokens: int = 512,
        max_running: int = 64,
        max_background_running: int | None = None,
        enable_prefix_caching: bool = True,
        step_target_seconds: float | None = DEFAULT_TARGET_SECONDS,
    ) -> None:
        """`step_target_seconds`: how long a step may take while a prompt prefills beside other work (the gap
        decoding streams see; step_budget.py); None sizes prompt chunks by `max_batch_tokens` alone.
        `max_background_running`: background sequences running at once (more wait, and take a finished one's
        place in the same step); None: only `max_running` bounds them."""
        self.model = model
        cfg = model.module.config
        if kv_cache_bytes is None:
            kv_cache_bytes = DEFAULT_KV_CACHE_MB * 1024 * 1024
        value_dim = getattr(cfg, "value_head_dim", None) or cfg.head_dim
        per_block = PagedKVCache.bytes_per_block(cfg.num_layers, block_size, cfg.num_kv_heads,
                                                 (cfg.head_dim + value_dim) // 2, model.dtype)
        num_blocks = max(1, kv_cache_bytes // per_block)
        self.kv = PagedKVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                               dtype=model.dtype, device=model.device, value_head_dim=value_dim)
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.scheduler = Scheduler(self.allocator, context_length=model.context_length,
                                   max_batch_tokens=max_batch_tokens, max_running=max_running,
                                   max_background_running=max_background_running,
                                   enable_prefix_caching=enable_prefix_caching)
        self.runner = ModelRunner(model.module, self.kv, model.device)
        self.step_budget = None if step_target_seconds is None else StepBudget(step_target_seconds)
        self.requests: dict[str, _Request] = {}
        self.steps = 0
        fmt = model.chat_format
        self.constraints = Constraints(model.tokenizer, fmt, fmt.stop_token_ids)
        # the special tokens the reply parser must read: decoded into the text rather than skipped
        kept = (model.tokenizer.token_to_id(token) for token in fmt.reply_tokens)
        self._reply_token_ids = frozenset(i for i in kept if i is not None)

    # ---- requests -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    stop_token_ids: set[int] | None = None, *, grammar: llguidance.LLMatcher | None = None,
                    reply_parser: ReplyParser | None = None, background: bool = False,
                    adapter: str | None = None) -> None:
        """Queue a request. Raises RequestTooLargeError if it can never fit the context or KV budget.

        `grammar`: a fresh matcher (`self.constraints.matcher_for(...)`) the reply must follow; it ends the
        reply ("stop") once complete. `reply_parser`: splits the text into content, reasoning and tool calls
        (`ChatFormat.reply_parser`); all content without one. `background`: batch work, scheduled after
        interactive requests (scheduler.py). `adapter`: the name of a loaded adapter (`model.adapters`) to
        run with; EngineRequestError if none is loaded by that name."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        loaded = None
        if adapter is not None:
            loaded = self.model.adapters.get(adapter)
            if loaded is None:
                raise EngineRequestError(f"no adapter named {adapter!r} is loaded")
        stops = set(self.model.chat_format.stop_token_ids if stop_token_ids is None else stop_token_ids)
        stops |= set(params.stop_token_ids)
        budget = params.max_tokens or (self.model.context_length - len(prompt_ids))
        seq = Sequence(request_id, list(prompt_ids), max(budget, 1), frozenset(stops), background=background)
        if loaded is not None:
            seq.adapter, seq.adapter_key = loaded.adapter, loaded.key
        self.scheduler.add(seq)
        decoder = self.model.tokenizer.stream_decoder(skip_special_tokens=True, keep=self._reply_token_ids)
        self.requests[request_id] = _Request(
            seq, params, decoder, StopStringMatcher(params.stop), make_generator(params, self.model.device),
            parser=reply_parser or ContentOnly(), grammar=grammar)

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> dict[str, int]:
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_total": self.allocator.num_blocks,
            "kv_blocks_in_use": self.allocator.num_in_use,
            "prefix_cache_hit_tokens": self.allocator.hits,
        }

    def _sample(self, sampling: list[ScheduledChunk], logits: torch.Tensor) -> dict[str, int]:
        """The next token of each sampling chunk (row i of `logits` is chunk i's). Constrained rows are masked
        first (in place; free rows are untouched), then the greedy rows take one argmax together, in
        float32: per row on bf16 logits it cost ~3 ms of a 16-row step. Constrained rows' matchers then
        consume their tokens."""
        sampled: dict[str, int] = {}
        requests = [self.requests[chunk.seq.seq_id] for chunk in sampling]
        constrained = [row for row, req in enumerate(requests) if req.grammar is not None]
        if constrained:
            grammars = [requests[row].grammar for row in constrained]
            mask_logits(logits, constrained, [g for g in grammars if g is not None],
                        self.constraints.ll_tokenizer.vocab_size)
        greedy = [row for row, req in enumerate(requests) if is_greedy(req.params)]
        if greedy:
            rows = logits[greedy] if len(greedy) < len(sampling) else logits[: len(sampling)]
            for row, token in zip(greedy, rows.float().argmax(dim=-1).tolist(), strict=True):
                sampled[sampling[row].seq.seq_id] = int(token)
        for row, chunk in enumerate(sampling):
            if chunk.seq.seq_id not in sampled:
                req = requests[row]
                sampled[chunk.seq.seq_id] = sample_token(logits[row], req.params, req.generator)
        for row in constrained:
            grammar = requests[row].grammar
            assert grammar is not None
            advance(grammar, sampled[sampling[row].seq.seq_id])
        return sampled

    # ---- one step -------------------------------------------------------------------------------------

    def step(self, abandoned: Callable[[str], bool] | None = None,
             interactive_waiting: Callable[[], bool] | None = None) -> list[tuple[str, GenerationEvent]]:
        """One batched forward pass and its sampled tokens. `abandoned(request_id)`, when given, is polled
        during the pass: once every request in the step is abandoned, the pass stops early and the step
        records nothing (the caller then aborts those requests, which frees their blocks).
        `interactive_waiting()`, polled the same way in a step that can wait: once an interactive request has
        arrived, the pass stops and records nothing, so the newcomer's prompt runs next instead of after the
        rest of the step (the step's rows run it again later; the layers done so far are lost). Steps that can
        wait: those of background rows only (a batch step), and those carrying a chunk from the middle of a
        long prompt - which the scheduler then sits out for one step, so a short request's first token comes
        about an idle TTFT after it arrives, not after the step in flight (issue 14). Decoding rows lose
        nothing: they are in the newcomer's step too."""
        plan = self.scheduler.schedule(self.step_budget)
        if not plan.chunks:
            return []
        cancelled = None
        if abandoned is not None or interactive_waiting is not None:
            ids = [chunk.seq.seq_id for chunk in plan.chunks]
            can_wait = all(c.seq.background for c in plan.chunks) or self.step_budget is not None and any(
                not c.seq.is_decoding and not c.samples for c in plan.chunks)
            yields = interactive_waiting if can_wait else None

            def cancelled() -> bool:
                if yields is not None and yields():
                    return True
                return abandoned is not None and all(abandoned(i) for i in ids)
        started = time.perf_counter()
        try:
            logits = self.runner.execute(plan, cancelled)
        except StepCancelled:
            return []
        sampling = [c for c in plan.chunks if c.samples]
        sampled = self._sample(sampling, logits)
        if self.step_budget is not None:  # timed after sampling, which waits for the device's results
            self.step_budget.observe([(c.start, c.num_tokens) for c in plan.chunks], time.perf_counter() - started)
        self.scheduler.update(plan, sampled)
        self.steps += 1
        events = []
        now = time.perf_counter()
        for chunk in sampling:
            seq = chunk.seq
            req = self.requests[seq.seq_id]
            if req.first_token_at is None:
                req.first_token_at = now - req.started
            event = self._event_for(req, sampled[seq.seq_id])
            if event is not None:
                events.append((seq.seq_id, event))
                if event.finish_reason is not None:
                    del self.requests[seq.seq_id]
        return events

    def _event_for(self, req: _Request, token: int) -> GenerationEvent | None:
        seq = req.seq
        stopped_by_token = seq.finish_reason == "stop"  # a stop id: not part of the text
        text = ""
        if not stopped_by_token:
            text, hit = req.stops.push(req.decoder.push(token))
            if hit:
                self.scheduler.finish(seq, "stop")
                return req.event(text, [token], "stop")
        reason = seq.finish_reason
        if req.grammar_done and not stopped_by_token:
            # the grammar is complete: the reply ends here, without waiting for the format's stop token
            self.scheduler.finish(seq, "stop")
            reason = "stop"
        if reason is None:
            return req.event(text, [token])
        tail, hit = req.stops.push(req.decoder.flush())
        tail += "" if hit else req.stops.flush()
        return req.event(text + tail, [] if stopped_by_token else [token], reason)

__all__ = ["EngineCore", "RequestTooLargeError"]
