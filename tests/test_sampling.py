"""Turning logits into tokens, and holding back stop strings while they could still match."""

from __future__ import annotations

import pytest
import torch

from glmstack.engine.sampling import (
    NUCLEUS_CANDIDATES,
    StopStringMatcher,
    make_generator,
    nucleus,
    sample_token,
)
from glmstack.protocol import SamplingParams

LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, float("-inf")])


def test_greedy_takes_the_largest_logit() -> None:
    assert sample_token(LOGITS, SamplingParams(do_sample=False)) == 1


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    """Dividing unshifted logits by a tiny temperature makes +inf, and softmax(inf - inf) is NaN."""
    # 1e-300 is 0 in float32 (0/0); logits of 1e36 over 1e-3 overflow to +inf unless shifted first
    for scale, temperature in ((1000, 1e-300), (1000, 1e-40), (1e36, 1e-3), (1000, 0.01)):
        params = SamplingParams(do_sample=True, temperature=temperature, top_p=1.0, seed=3)
        picks = {sample_token(LOGITS * scale, params, make_generator(params, torch.device("cpu")))
                 for _ in range(20)}
        assert picks == {1}, temperature


def test_top_k_top_p_and_seed() -> None:
    cpu = torch.device("cpu")
    top2 = SamplingParams(do_sample=True, temperature=5.0, top_k=2, top_p=1.0)
    assert {sample_token(LOGITS, top2) for _ in range(200)} == {1, 2}  # never the others
    nucleus = SamplingParams(do_sample=True, temperature=1.0, top_p=0.01)
    assert {sample_token(LOGITS, nucleus) for _ in range(50)} == {1}  # the smallest prefix: the leader
    seeded = SamplingParams(do_sample=True, temperature=2.0, top_p=1.0, seed=42)
    runs = [[sample_token(LOGITS, seeded, gen) for _ in range(30)]
            for gen in (make_generator(seeded, cpu), make_generator(seeded, cpu))]
    assert runs[0] == runs[1] and len(set(runs[0])) > 1
    assert sample_token(LOGITS, SamplingParams(do_sample=True, temperature=1.0)) != 4  # -inf: never


def _nucleus_by_full_sort(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    ordered, order = torch.sort(probs, descending=True)
    return ordered.masked_fill(torch.cumsum(ordered, dim=-1) - ordered >= top_p, 0.0), order


@pytest.mark.parametrize("spread", [1.0, 3.0, 30.0])  # peaked (a few tokens) to flat (thousands)
@pytest.mark.parametrize("top_p", [0.1, 0.7, 0.95])
def test_nucleus_is_the_full_sorts_nucleus(spread: float, top_p: float) -> None:
    """Looked for among the top candidates first, or over the whole vocabulary when they fall short: the
    kept tokens and their probabilities are exactly what sorting everything keeps."""
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(int(spread * 100 + top_p * 10))) * 8
    probs = torch.softmax(logits / spread, dim=-1)
    kept, order = nucleus(probs, top_p)
    ref_kept, ref_order = _nucleus_by_full_sort(probs, top_p)
    n = int((ref_kept > 0).sum())
    assert int((kept > 0).sum()) == n
    assert torch.equal(order[:n], ref_order[:n]) and torch.equal(kept[:n], ref_kept[:n])
    if spread == 1.0:
        assert kept.shape[0] == NUCLEUS_CANDIDATES  # the candidates sufficed
    if spread == 30.0 and top_p >= 0.7:
        assert kept.shape[0] == probs.shape[0] and n > NUCLEUS_CANDIDATES  # they did not: the full sort


def test_stop_strings_are_held_back_until_they_cannot_match() -> None:
    matcher = StopStringMatcher(["</end>", "STOP"])
    assert matcher.push("Hello </") == ("Hello ", False)  # "</" could start "</end>"
    assert matcher.push("b> world ST") == ("</b> world ", False)
    assert matcher.push("OP and more") == ("", True)  # everything from the stop string on is dropped
    tail = StopStringMatcher(["STOP"])
    assert tail.push("almost ST") == ("almost ", False)
    assert tail.flush() == "ST"  # the end of the stream releases what was held
