"""Scheduler and block bookkeeping with fake tokens: no model, no torch."""

from __future__ import annotations

import pytest

from glmstack.engine.serving.block_allocator import BlockAllocator
from glmstack.engine.serving.scheduler import RequestTooLargeError, Scheduler, Sequence, Status


def make(num_blocks: int = 32, block_size: int = 4, budget: int = 16, **kw) -> Scheduler:
    return Scheduler(BlockAllocator(num_blocks, block_size), context_length=1000, max_batch_tokens=budget, **kw)


def fake_step(s: Scheduler, next_token: int = 7) -> dict[str, tuple[int, int]]:
    plan = s.schedule()
    s.update(plan, {c.seq.seq_id: next_token for c in plan.chunks if c.samples})
    return {c.seq.seq_id: (c.start, c.num_tokens) for c in plan.chunks}


def test_chunked_prefill_then_decode_with_joins_between_steps() -> None:
    s = make(budget=8)
    a = Sequence("a", list(range(20)), max_tokens=3)
    s.add(a)
    assert fake_step(s) == {"a": (0, 8)}
    b = Sequence("b", list(range(100, 105)), max_tokens=2)
    s.add(b)  # joins while a is still prefilling: the shorter prompt goes first
    # a's 3 tokens of room would end mid-block (positions 8..10 of blocks of 4): a partial chunk ends on a
    # block boundary, so a waits for the next step
    assert fake_step(s) == {"b": (0, 5)}
    step = fake_step(s)
    assert step == {"b": (5, 1), "a": (8, 4)} and list(step)[0] == "b"  # decodes first; 7 of room -> 4
    assert b.status is Status.FINISHED and b.output_ids == [7, 7]
    assert fake_step(s) == {"a": (12, 8)}  # a's last prompt tokens (a final chunk may end anywhere): it samples
    fake_step(s)
    fake_step(s)
    assert a.status is Status.FINISHED and a.finish_reason == "length" and a.output_ids == [7, 7, 7]
    assert s.allocator.num_in_use == 0


def test_stop_token_finishes_without_appending() -> None:
    s = make()
    seq = Sequence("x", [1, 2, 3], max_tokens=10, stop_token_ids=frozenset({9}))
    s.add(seq)
    fake_step(s, next_token=9)
    assert seq.finish_reason == "stop" and seq.output_ids == []


def test_prefix_blocks_are_reused_and_lru_evicted() -> None:
    alloc = BlockAllocator(4, 4)
    s = Scheduler(alloc, context_length=100, max_batch_tokens=64)
    first = Sequence("first", list(range(13)), max_tokens=1)
    s.add(first)
    fake_step(s)
    assert first.status is Status.FINISHED
    second = Sequence("second", list(range(12)) + [99, 98], max_tokens=1)
    s.add(second)
    plan = s.schedule()
    assert plan.chunks[0].start == 12 and second.prefix_hit_tokens == 12  # three full blocks reused
    s.update(plan, {"second": 5})
    # a different prompt needing every block evicts the cached ones (LRU), nothing deadlocks
    third = Sequence("third", list(range(200, 214)), max_tokens=2)
    s.add(third)
    while s.has_work():
        fake_step(s)
    assert third.output_ids == [7, 7] and alloc.num_in_use == 0


def test_never_reuses_the_whole_prompt() -> None:
    alloc = BlockAllocator(8, 4)
    s = Scheduler(alloc, context_length=100, max_batch_tokens=64)
    for name in ("one", "two"):
        seq = Sequence(name, list(range(8)), max_tokens=1)
        s.add(seq)
        plan = s.schedule()
        assert plan.chunks[0].num_tokens >= 1 and plan.chunks[0].samples
        s.update(plan, {name: 1})
    assert seq.prefix_hit_tokens == 4  # the last block is recomputed to produce logits


def test_preemption_under_pressure_recomputes_and_finishes_everyone() -> None:
    s = make(num_blocks=6, block_size=4, budget=32)
    seqs = [Sequence(f"s{i}", list(range(i * 10, i * 10 + 6)), max_tokens=8) for i in range(3)]
    for seq in seqs:
        s.add(seq)
    for _ in range(200):
        if not s.has_work():
            break
        fake_step(s)
    assert all(seq.status is Status.FINISHED and len(seq.output_ids) == 8 for seq in seqs)
    assert s.preemptions > 0 and s.allocator.num_in_use == 0


def test_abort_frees_blocks_at_once() -> None:
    s = make()
    seq = Sequence("x", list(range(30)), max_tokens=50)
    s.add(seq)
    fake_step(s)
    assert s.allocator.num_in_use > 0
    s.abort("x")
    assert s.allocator.num_in_use == 0 and not s.has_work() and seq.finish_reason == "abort"


def test_abort_of_a_request_still_waiting_for_room() -> None:
    """A request queued because the pool is full (what a hung-up client leaves when the engine is full) leaves
    the queue at once, takes nothing, and the running one is untouched."""
    s = make(num_blocks=4, block_size=4)
    s.add(Sequence("a", list(range(13)), max_tokens=3))
    assert fake_step(s) == {"a": (0, 13)}  # all four blocks
    waiting = Sequence("b", list(range(50, 54)), max_tokens=1)
    s.add(waiting)
    assert "b" not in fake_step(s) and waiting in s.waiting
    s.abort("b")
    assert waiting not in s.waiting and waiting.finish_reason == "abort" and waiting.block_table == []
    assert s.allocator.num_in_use == 4 and fake_step(s) == {"a": (14, 1)}  # a's last token


def test_too_large_requests_are_refused_up_front() -> None:
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(RequestTooLargeError, match="KV cache"):
        s.add(Sequence("big", list(range(10)), max_tokens=10))
    with pytest.raises(RequestTooLargeError, match="context window"):
        Scheduler(BlockAllocator(4, 4), context_length=8).add(Sequence("long", list(range(8)), max_tokens=1))
    assert not s.has_work()


def test_prompts_sent_together_with_one_prefix_compute_it_once() -> None:
    s = make(budget=64)
    system = list(range(10))  # two and a half blocks of 4 in common
    first, second = Sequence("first", system + [50, 51], max_tokens=2), Sequence("second", system + [60], max_tokens=2)
    other = Sequence("other", list(range(100, 106)), max_tokens=2)
    for seq in (first, second, other):
        s.add(seq)
    # second waits while first computes the shared blocks; other, with a prefix of its own, goes on
    assert fake_step(s) == {"first": (0, 12), "other": (0, 6)}
    assert fake_step(s) == {"first": (12, 1), "other": (6, 1), "second": (8, 3)}
    assert second.prefix_hit_tokens == 8  # its two full shared blocks, from first's computation


def test_interactive_requests_go_before_waiting_background_ones() -> None:
    s = make(budget=64, max_running=2)
    batch = [Sequence(f"b{i}", list(range(10 * i, 10 * i + 6)), max_tokens=50, background=True) for i in range(3)]
    for seq in batch:
        s.add(seq)
    fake_step(s)  # b0 and b1 run; b2 waits
    chat = Sequence("chat", list(range(500, 506)), max_tokens=2)
    s.add(chat)
    assert [q.seq_id for q in s.waiting] == ["chat", "b2"]
    b0 = batch[0]
    s.finish(b0, "abort")  # a slot frees: the interactive request takes it, not the older batch line
    assert "chat" in fake_step(s) and batch[2].status is Status.WAITING


def test_interactive_prompt_is_chunked_before_background_prompts() -> None:
    s = make(budget=8, num_blocks=64)
    s.add(Sequence("batch", list(range(4)), max_tokens=5, background=True))  # shorter, but background
    s.add(Sequence("chat", list(range(100, 108)), max_tokens=5))
    assert fake_step(s) == {"chat": (0, 8)}


def test_background_sequences_are_preempted_before_interactive_ones() -> None:
    s = make(num_blocks=6, block_size=4, budget=16)
    batch = Sequence("batch", list(range(100, 107)), max_tokens=10, background=True)
    s.add(batch)
    fake_step(s)
    chat = Sequence("chat", list(range(7)), max_tokens=10)
    s.add(chat)  # younger, so without priority it would be the one to give up its blocks
    fake_step(s)
    chat_order = chat.order
    while s.preemptions == 0 and s.has_work():
        fake_step(s)
    # the batch line gave up its blocks (it was admitted again, with a new order); the chat kept running
    assert s.preemptions == 1 and chat.order == chat_order and batch.order > chat_order
    while s.has_work():
        fake_step(s)
    assert chat.output_ids == [7] * 10 and batch.output_ids == [7] * 10  # the batch line recomputes and ends


def test_a_step_with_an_interactive_prompt_leaves_the_background_rows_out() -> None:
    s = make(budget=64, num_blocks=64)
    batch = [Sequence(f"b{i}", list(range(10 * i, 10 * i + 6)), max_tokens=20, background=True) for i in range(3)]
    for seq in batch:
        s.add(seq)
    fake_step(s)
    assert set(fake_step(s)) == {"b0", "b1", "b2"}  # decoding
    s.add(Sequence("chat", list(range(500, 520)), max_tokens=3))
    assert fake_step(s) == {"chat": (0, 20)}  # alone: a step as short as on an idle server
    assert all(len(b.output_ids) == 2 for b in batch)  # the batch rows sat that step out...
    assert set(fake_step(s)) == {"chat", "b0", "b1", "b2"}  # ...and everyone decodes together again
    assert all(len(b.output_ids) == 3 for b in batch)


def test_background_rows_are_capped_and_a_queued_one_takes_a_finished_ones_place_in_the_next_step() -> None:
    s = make(budget=64, num_blocks=64, max_background_running=2)
    batch = [Sequence(f"b{i}", list(range(10 * i, 10 * i + 6)), max_tokens=2, background=True) for i in range(3)]
    for seq in batch:
        s.add(seq)
    assert set(fake_step(s)) == {"b0", "b1"}  # two of three run; b2 waits in the engine
    s.add(Sequence("chat", list(range(500, 506)), max_tokens=2))
    assert set(fake_step(s)) == {"chat"}  # interactive ones are not capped (and prefill alone)
    fake_step(s)  # b0 and b1 finish
    assert batch[0].status is Status.FINISHED and "b2" in fake_step(s)  # at once, no round trip
