"""Turning logits into tokens, and holding back stop strings while they could still match."""

from __future__ import annotations

import torch

from glmstack.engine.sampling import StopStringMatcher, make_generator, sample_token
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


def test_stop_strings_are_held_back_until_they_cannot_match() -> None:
    matcher = StopStringMatcher(["</end>", "STOP"])
    assert matcher.push("Hello </") == ("Hello ", False)  # "</" could start "</end>"
    assert matcher.push("b> world ST") == ("</b> world ", False)
    assert matcher.push("OP and more") == ("", True)  # everything from the stop string on is dropped
    tail = StopStringMatcher(["STOP"])
    assert tail.push("almost ST") == ("almost ", False)
    assert tail.flush() == "ST"  # the end of the stream releases what was held
