"""Turning logits into the next token, and spotting stop strings in streamed text."""

from __future__ import annotations

import torch

from glmstack.protocol import SamplingParams

GREEDY_TEMPERATURE = 1e-4
NUCLEUS_CANDIDATES = 64


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.seed is None or params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def is_greedy(params: SamplingParams) -> bool:
    """Whether `params` pick the most likely token. Below GREEDY_TEMPERATURE, sampling is argmax for any
    logit gap over ~0.01 anyway, and a temperature that rounds to 0 in float32 would divide 0 by 0 (NaN fails
    the whole batch's step)."""
    return params.greedy or params.temperature < GREEDY_TEMPERATURE


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits: [V] for one sequence. Greedy, or temperature -> top-k -> top-p (nucleus) sampling."""
    if is_greedy(params):
        return int(torch.argmax(logits))
    # Shifted so the largest logit is 0 before dividing: a small temperature then sends the others to -inf,
    # never the leader to +inf (inf - inf in softmax is NaN).
    logits = logits.float()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        kept, order = nucleus(probs, params.top_p)
        return int(order[torch.multinomial(kept, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p: the smallest set of most likely tokens whose mass reaches top_p (always at least the first).
    Returns (their probabilities, zero past the set; the token ids), most likely first.

    The set is usually a handful of tokens, so it is looked for among the NUCLEUS_CANDIDATES most likely
    (a top-k) before sorting the whole vocabulary: sorting 49k probabilities per sequence per step took
    half of a 32-stream server's engine time. When the candidates' mass reaches top_p, the set lies
    within them and the result is the same as the full sort's."""
    top, order = torch.topk(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]))
    if top.shape[-1] < probs.shape[-1] and float(top.sum()) < top_p:
        top, order = torch.sort(probs, descending=True)
    drop = torch.cumsum(top, dim=-1) - top >= top_p
    return top.masked_fill(drop, 0.0), order


class StopStringMatcher:
    """Streams text through, holding back any tail that could still become a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped). Once stopped, the stop string and anything after it is dropped."""
        if not self.stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
