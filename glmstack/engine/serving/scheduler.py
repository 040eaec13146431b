"""Continuous batching bookkeeping: which sequences run in the next forward pass, and with how many tokens.

No torch here: the scheduler decides, the runner (runner.py) turns decisions into tensors. Each step:

1. every running sequence that is decoding gets one token (they are cheap and latency-sensitive);
2. the remaining budget goes to prompts in chunks (chunked prefill), shortest remaining first; with a
   `StepBudget` each chunk is sized by time, not tokens alone, so a long prompt never stalls the streams
   already running nor the short requests that arrive behind it;
3. KV blocks are allocated as needed; a new prompt first takes whatever prefix the cache already holds
   (computed with the same adapter, or none).
   When blocks run out, the most recently admitted sequence is preempted: its blocks are freed and it is
   recomputed later (its cached full blocks usually survive, so recomputation is mostly prefix hits).

Background sequences (batch lines, async tasks) come after interactive ones everywhere a choice is made: an
interactive request waits in front of them, its prompt is chunked first, a step that computes an interactive
prompt leaves the background rows out (so a chat's time to first token is that of an idle server's step), and
when blocks run out a background sequence is preempted before any interactive one. Otherwise they decode every
step, so a batch runs at full speed whenever nothing interactive needs the room. (The serving loop also
abandons a step of background rows only when an interactive request arrives during it: core.step.)

Sequences leave between steps: finished (stop id, max_tokens, context full) or aborted, freeing every
block they held.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from glmstack.engine.serving.block_allocator import BlockAllocator, OutOfBlocks
from glmstack.engine.serving.step_budget import StepBudget


class RequestTooLargeError(ValueError):
    """The request can never fit the KV budget or the context, whatever else is running."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[int] = field(default_factory=list)  # hash chain of the registered full blocks
    status: Status = Status.WAITING
    finish_reason: str | None = None
    order: int = 0  # admission order, for preemption
    prefix_hit_tokens: int = 0
    yielded: bool = False  # the last step left this prompt out for newer ones (never two steps running)
    background: bool = False  # batch work: after interactive requests (see the module docstring)
    # The LoRA / P-Tuning adapter the sequence runs with (runner.py applies it; opaque here), None for the base,
    # and its load's key, which roots the sequence's prefix hash chain (BlockAllocator.root_hash).
    adapter: object | None = None
    adapter_key: int | None = None

    @property
    def root_hash(self) -> int | None:
        return BlockAllocator.root_hash(self.adapter_key)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """Running with one generated token to compute. (A prompt's own last token is a prompt chunk: every
        prompt token goes through the prompt path, so it computes the same cold or after a cache hit.)"""
        return self.status is Status.RUNNING and bool(self.output_ids) and self.num_computed == self.num_tokens - 1


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its logits pick the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk]  # decodes first (one token each), then prefill chunks

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        context_length: int,
        max_batch_tokens: int = 512,
        max_running: int = 64,
        max_background_running: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.allocator = allocator
        self.context_length = context_length
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        # The job runner keeps a few more batch lines queued here than may run, so that one ending is replaced
        # in the same step instead of after a round trip through the platform (a step or two per line).
        self.max_background_running = max_background_running
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._order = itertools.count()
        self.preemptions = 0

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- lifecycle ------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise RequestTooLargeError("empty prompt")
        if seq.max_tokens < 1:
            raise RequestTooLargeError("max_tokens must be at least 1")
        total = len(seq.prompt_ids) + seq.max_tokens
        if len(seq.prompt_ids) >= self.context_length:
            raise RequestTooLargeError(
                f"prompt is {len(seq.prompt_ids)} tokens; the context window is {self.context_length}")
        seq.max_tokens = min(seq.max_tokens, self.context_length - len(seq.prompt_ids))
        total = len(seq.prompt_ids) + seq.max_tokens
        if self.allocator.blocks_for(total) > self.allocator.num_blocks:
            raise RequestTooLargeError(
                f"request needs {total} tokens of KV cache; the whole budget is "
                f"{self.allocator.num_blocks * self.block_size} tokens")
        if seq.background:
            self.waiting.append(seq)
            return
        # an interactive request goes in front of every waiting background one, behind the interactive ones
        position = next((i for i, s in enumerate(self.waiting) if s.background), len(self.waiting))
        self.waiting.insert(position, seq)

    def abort(self, seq_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.seq_id == seq_id:
                self._finish(seq, "abort")
                return seq
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0

    # ---- planning -------------------------------------------------------------------------------------

    def schedule(self, step_budget: StepBudget | None = None) -> StepPlan:
        """The next step. With a `step_budget`, prompt chunks are sized to keep the step near its target time
        whenever anything else runs beside them (see step_budget.py); without one, by tokens alone."""
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        # 1. decodes: one token each, oldest first; preempt the youngest when blocks run out
        for seq in sorted((s for s in self.running if s.is_decoding), key=lambda s: s.order):
            if seq.status is not Status.RUNNING:
                continue  # preempted below while making room for an older sequence
            if budget == 0:
                break
            if not self._make_room(seq, seq.num_computed + 1):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed, 1))
            budget -= 1
        # 2. prompts: new ones join the prompts in progress (in arrival order, while there is room), then
        #    the shortest remaining goes first, so a short request that arrives during a long prompt gets its
        #    first token in the next step. The oldest prompt advances at least a block per step, except that
        #    it sits out a step that newer prompts take (never two steps running).
        prompts = sorted((s for s in self.running if not s.is_decoding), key=lambda s: s.order)
        self._admit_waiting(prompts)
        timed = step_budget is not None and (bool(chunks) or len(prompts) > 1)
        newer_scheduled = False
        for seq in sorted(prompts, key=lambda s: (s.background, s.num_tokens - s.num_computed, s.order)):
            if budget == 0:
                break
            limit = budget
            if timed:
                assert step_budget is not None
                planned = [(c.start, c.num_tokens) for c in chunks]
                oldest = seq is prompts[0]
                if oldest and newer_scheduled and not seq.yielded:
                    seq.yielded = True  # this step is the newcomers': their first tokens come a chunk sooner
                    continue
                minimum = self.block_size if oldest else 0
                limit = step_budget.prefill_tokens(planned, seq.num_computed, budget, minimum)
                seq.yielded = False
                if limit == 0:
                    continue
            chunk = self._prefill_chunk(seq, limit)
            if chunk is not None:
                chunks.append(chunk)
                budget -= chunk.num_tokens
                newer_scheduled = newer_scheduled or seq is not prompts[0]
        if any(not c.seq.background and not c.seq.is_decoding for c in chunks):
            # An interactive prompt is in this step: it runs without the background rows, so its first token
            # comes after a step as short as on an idle server. Their blocks stay allocated; they run next step.
            chunks = [c for c in chunks if not c.seq.background]
        return StepPlan(chunks)

    def _admit_waiting(self, prompts: list[Sequence]) -> None:
        """Move waiting sequences to running (in arrival order, while there is room), adding them to
        `prompts`. One whose first block is the same as that of a prompt still computing it (requests sent
        together with one system prompt) waits a step instead, and then takes those blocks from the prefix
        cache: sixteen such chats compute their shared prefix once, not sixteen times."""
        computing = [s for s in prompts if s.num_computed < self.block_size]
        deferred: list[Sequence] = []
        background = sum(s.background for s in self.running)
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.background and self.max_background_running is not None:
                if background >= self.max_background_running:
                    break  # only background ones wait behind it (interactive requests are queued first)
                background += 1
            if self.enable_prefix_caching and len(seq.prompt_ids) > self.block_size and any(
                    s.prompt_ids[: self.block_size] == seq.prompt_ids[: self.block_size]
                    and s.adapter_key == seq.adapter_key for s in computing):
                deferred.append(self.waiting.popleft())
                continue
            if not self._admit(seq):
                break
            prompts.append(self.waiting.popleft())
            if seq.num_computed < self.block_size:
                computing.append(seq)
        self.waiting.extendleft(reversed(deferred))  # back at the front, in their order

    def _admit(self, seq: Sequence) -> bool:
        """Move a waiting sequence to running, taking its cached prefix. False if no block is free."""
        if self.allocator.num_free == 0:
            return False
        if self.enable_prefix_caching:
            seq.block_table = self.allocator.match_prefix(seq.token_ids, seq.root_hash)
            seq.num_computed = len(seq.block_table) * self.block_size
            seq.prefix_hit_tokens = seq.num_computed
            parent = seq.root_hash
            for b in range(len(seq.block_table)):
                parent = self.allocator.chain_hash(parent, seq.token_ids[b * self.block_size:(b + 1) * self.block_size])
                seq.block_hashes.append(parent)
        seq.status, seq.order = Status.RUNNING, next(self._order)
        self.running.append(seq)
        return True

    def _prefill_chunk(self, seq: Sequence, budget: int) -> ScheduledChunk | None:
        remaining = seq.num_tokens - seq.num_computed
        n = min(remaining, budget)
        if n < remaining:
            # A partial chunk ends on a block boundary: prompt attention runs per block of positions
            # (kv_cache.PagedPrefill), and a block split across two steps would compute differently than
            # whole. Less than a block of room: the prompt waits for the next step (unless a step can never
            # hold a block).
            aligned = (seq.num_computed + n) // self.block_size * self.block_size - seq.num_computed
            if aligned <= 0 and self.max_batch_tokens >= self.block_size:
                return None
            n = aligned if aligned > 0 else n
        # shrink the chunk to what fits in the free blocks rather than preempting others for a prefill
        have = len(seq.block_table) * self.block_size - seq.num_computed
        free_tokens = have + self.allocator.num_free * self.block_size
        n = min(n, free_tokens)
        if n <= 0:
            return None
        if not self._make_room(seq, seq.num_computed + n, preempt=False):
            return None
        return ScheduledChunk(seq, seq.num_computed, n)

    def _make_room(self, seq: Sequence, num_tokens: int, *, preempt: bool = True) -> bool:
        """Grow `seq`'s block table to hold `num_tokens`; preempt younger sequences if needed."""
        while len(seq.block_table) * self.block_size < num_tokens:
            try:
                seq.block_table.append(self.allocator.allocate())
            except OutOfBlocks:
                # the youngest background sequence first, then the youngest interactive one
                victim = max((s for s in self.running if s is not seq), key=_preemption_rank, default=None)
                if not preempt or victim is None or _preemption_rank(victim) < _preemption_rank(seq):
                    if preempt:  # seq itself is the youngest: it waits
                        self._preempt(seq)
                    return False
                self._preempt(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self._release(seq)
        seq.status = Status.WAITING
        self.running.remove(seq)
        if seq.background:  # first of the background ones, still behind every waiting interactive request
            self.waiting.insert(next((i for i, s in enumerate(self.waiting) if s.background), len(self.waiting)), seq)
        else:
            self.waiting.appendleft(seq)

    # ---- results --------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Record a step's results: computed tokens advance, sampled tokens append. Returns the sequences
        that finished in this step (their blocks already freed)."""
        finished: list[Sequence] = []
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            seq.num_computed = chunk.start + chunk.num_tokens
            self._register_full_blocks(seq)
            if not chunk.samples:
                continue
            token = sampled[seq.seq_id]
            if token in seq.stop_token_ids:
                self._finish(seq, "stop")
            else:
                seq.output_ids.append(token)
                if len(seq.output_ids) >= seq.max_tokens:
                    self._finish(seq, "length")
            if seq.status is Status.FINISHED:
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence for a reason decided outside (a stop string matched in the text)."""
        if seq.status is not Status.FINISHED:
            self._finish(seq, reason)

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed // self.block_size
        ids = seq.token_ids
        while len(seq.block_hashes) < full:
            b = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.root_hash
            tokens = ids[b * self.block_size : (b + 1) * self.block_size]
            seq.block_hashes.append(self.allocator.register_full(seq.block_table[b], parent, tokens))


def _preemption_rank(seq: Sequence) -> tuple[bool, int]:
    """Higher gives up its blocks first: background before interactive, then the most recently admitted."""
    return seq.background, seq.order


def count_blocks(seqs: Iterable[Sequence]) -> int:
    return sum(len(s.block_table) for s in seqs)
