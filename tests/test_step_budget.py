"""The step-time model that sizes prompt chunks (engine/serving/step_budget.py) and the scheduler's use of it."""

from __future__ import annotations

import random

import pytest

from glmstack.engine.serving.block_allocator import BlockAllocator
from glmstack.engine.serving.scheduler import Scheduler, Sequence
from glmstack.engine.serving.step_budget import MIN_SAMPLES, StepBudget, step_features

# A machine whose steps cost 20 ms + 1 ms per token + 0.2 us per attention pair
COSTS = (0.02, 0.001, 2e-7)


def true_seconds(chunks: list[tuple[int, int]]) -> float:
    return sum(c * f for c, f in zip(COSTS, step_features(chunks), strict=True))


def trained(target: float = 0.2, noise: float = 0.0) -> StepBudget:
    budget = StepBudget(target)
    rng = random.Random(0)
    for _ in range(40):  # decode steps of varied batch and context, and prompt chunks
        chunks = [(rng.randrange(10, 3000), 1) for _ in range(rng.randrange(1, 9))]
        if rng.random() < 0.5:
            chunks.append((rng.randrange(0, 4000), rng.randrange(16, 512)))
        budget.observe(chunks, true_seconds(chunks) * (1 + rng.uniform(-noise, noise)))
    return budget


def test_features_count_rows_and_attention_pairs() -> None:
    assert step_features([(0, 512), (4000, 1), (99, 1)]) == (1.0, 514.0, 512 * 512 + 4001 + 100)


def test_the_fit_recovers_the_costs() -> None:
    fitted = trained().costs
    assert fitted is not None
    assert all(abs(f - c) / c < 1e-6 for f, c in zip(fitted, COSTS, strict=True))
    noisy = trained(noise=0.1)  # steps timed +-10%: the costs within 20%, a step's prediction within 10%
    assert noisy.costs is not None and all(abs(f - c) / c < 0.2 for f, c in zip(noisy.costs, COSTS, strict=True))
    step = [(300, 1), (310, 1), (2000, 100)]
    assert abs(noisy.predict(step) - true_seconds(step)) / true_seconds(step) < 0.1  # type: ignore[operator]


def test_nothing_is_limited_before_the_model_knows_the_machine() -> None:
    budget = StepBudget()
    for _ in range(MIN_SAMPLES - 1):
        budget.observe([(0, 1)], 0.05)
    assert budget.costs is None and budget.prefill_tokens([(100, 1)], 4000, 512, 0) == 512


def test_same_shaped_steps_cannot_be_told_apart() -> None:
    budget = StepBudget()
    for _ in range(20):
        budget.observe([(100, 1), (200, 1)], 0.05)
    assert budget.prefill_tokens([(100, 1)], 0, 512, 0) == 512


@pytest.mark.parametrize("start", [0, 2000, 4500])
def test_a_chunk_is_sized_to_the_target(start: int) -> None:
    budget = trained(target=0.2)
    decodes = [(300, 1), (310, 1)]
    n = budget.prefill_tokens(decodes, start, 512, 0)
    assert 0 < n < 512
    assert true_seconds([*decodes, (start, n)]) <= 0.2 + 1e-6 < true_seconds([*decodes, (start, n + 1)])


def test_later_chunks_of_a_prompt_are_smaller() -> None:
    budget = trained()
    sizes = [budget.prefill_tokens([(300, 1)], start, 512, 0) for start in (0, 1000, 3000, 6000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_the_minimum_is_kept_even_past_the_target() -> None:
    budget = trained(target=0.001)  # nothing fits
    assert budget.prefill_tokens([(300, 1)], 0, 512, 0) == 0
    assert budget.prefill_tokens([(300, 1)], 0, 512, 16) == 16


def new_scheduler() -> Scheduler:
    return Scheduler(BlockAllocator(1024, 16), context_length=8192, max_batch_tokens=512)


def run(s: Scheduler, budget: StepBudget | None, token: int = 7) -> dict[str, tuple[int, int]]:
    plan = s.schedule(budget)
    s.update(plan, {c.seq.seq_id: token for c in plan.chunks if c.samples})
    return {c.seq.seq_id: (c.start, c.num_tokens) for c in plan.chunks}


def test_a_long_prompt_alone_takes_the_whole_token_budget() -> None:
    budget = trained(target=0.05)
    s = new_scheduler()
    s.add(Sequence("long", list(range(3000)), max_tokens=1))
    assert run(s, budget) == {"long": (0, 512)}


def test_beside_decoding_streams_a_long_prompt_is_held_to_the_target() -> None:
    budget = trained(target=0.2)
    s = new_scheduler()
    stream = Sequence("stream", list(range(20)), max_tokens=10_000)
    s.add(stream)
    run(s, budget)  # its prompt; it decodes from now on
    s.add(Sequence("long", list(range(5000, 10000)), max_tokens=1))
    for _ in range(30):
        step = run(s, budget)
        assert "stream" in step  # the stream gets a token every step
        chunks = [(start, n) for start, n in step.values()]
        assert true_seconds(chunks) <= 0.2 + 1e-6 or step["long"][1] == 16  # the target, or the minimum


def test_a_short_request_behind_a_long_prompt_goes_first() -> None:
    budget = trained(target=0.2)
    s = new_scheduler()
    s.add(Sequence("long", list(range(5000)), max_tokens=1))
    run(s, budget)
    s.add(Sequence("short", list(range(9000, 9030)), max_tokens=1))
    step = run(s, budget)
    # its whole prompt, in the first step it is there for, and that step is its own: the long prompt's
    # chunk would make the newcomer's first token wait for it
    assert step == {"short": (0, 30)}
    s.add(Sequence("short2", list(range(9100, 9130)), max_tokens=1))
    step = run(s, budget)  # another newcomer at once: the long prompt does not sit out twice running
    assert step["short2"] == (0, 30) and step["long"][1] >= 16
