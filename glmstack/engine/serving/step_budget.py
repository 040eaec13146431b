"""How many prompt tokens one step may take without holding up everyone else.

A step's time is modelled as `fixed + per_row * rows + per_pair * pairs`, where `rows` are the tokens computed
and `pairs` the (query, key) pairs attention visits: a chunk of n tokens starting at position s visits
n * (s + n) of them, a decoding sequence its whole context. The pairs term is why a fixed token budget
fails: a 512-token chunk costs a few hundred milliseconds at the start of a prompt and seconds at its 5,000th
token. The three costs are fitted (least squares, recent steps weighted most) to the steps the engine has
timed, so the model follows the machine, the precision and the load.

While anything else is running (sequences decoding, other prompts), a step is held to `target_seconds`; a
prompt alone takes the whole token budget. Plain Python, like the scheduler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

DEFAULT_TARGET_SECONDS = 0.2  # the gap a decoding stream may see while a long prompt prefills
MIN_SAMPLES = 6  # steps observed before the model limits anything


def step_features(chunks: Iterable[tuple[int, int]]) -> tuple[float, float, float]:
    """(1, rows, attention pairs) of a step given its chunks as (start, num_tokens)."""
    rows = pairs = 0
    for start, n in chunks:
        rows += n
        pairs += n * (start + n)
    return 1.0, float(rows), float(pairs)


class StepBudget:
    def __init__(self, target_seconds: float = DEFAULT_TARGET_SECONDS, window: int = 256) -> None:
        self.target_seconds = target_seconds
        self._samples: deque[tuple[tuple[float, float, float], float]] = deque(maxlen=window)
        self._costs: tuple[float, float, float] | None = None

    def observe(self, chunks: Iterable[tuple[int, int]], seconds: float) -> None:
        self._samples.append((step_features(chunks), seconds))
        self._costs = None  # refitted on next use

    @property
    def costs(self) -> tuple[float, float, float] | None:
        """(fixed, per row, per pair) seconds, or None until enough varied steps were seen."""
        if self._costs is None and len(self._samples) >= MIN_SAMPLES:
            self._costs = _fit(list(self._samples))
        return self._costs

    def predict(self, chunks: Iterable[tuple[int, int]]) -> float | None:
        costs = self.costs
        if costs is None:
            return None
        return sum(c * f for c, f in zip(costs, step_features(chunks), strict=True))

    def prefill_tokens(self, planned: list[tuple[int, int]], start: int, limit: int, minimum: int) -> int:
        """The most tokens (at least `minimum`, at most `limit`) a chunk starting at `start` may add to the
        `planned` chunks and keep the step within the target; `limit` while the model knows nothing yet."""
        if self.predict(planned) is None:
            return limit
        low, high = 0, limit  # the cost grows with n: binary search for the largest n that fits
        while low < high:
            mid = (low + high + 1) // 2
            if self.predict([*planned, (start, mid)]) <= self.target_seconds:  # type: ignore[operator]
                low = mid
            else:
                high = mid - 1
        return max(low, min(minimum, limit))


def _fit(samples: list[tuple[tuple[float, float, float], float]]) -> tuple[float, float, float] | None:
    """Weighted least squares with non-negative costs (a negative one is dropped and the rest refitted);
    None when the steps seen so far cannot tell the costs apart."""
    weights = [0.97 ** (len(samples) - 1 - i) for i in range(len(samples))]  # recent steps count most
    active = [0, 1, 2]
    while active:
        solution = _solve(samples, weights, active)
        if solution is None:
            return None
        negative = [j for j, value in zip(active, solution, strict=True) if value < 0]
        if not negative:
            costs = [0.0, 0.0, 0.0]
            for j, value in zip(active, solution, strict=True):
                costs[j] = value
            return costs[0], costs[1], costs[2]
        active = [j for j in active if j not in negative]
    return None


def _solve(samples: list[tuple[tuple[float, float, float], float]], weights: list[float],
           active: list[int]) -> list[float] | None:
    """The normal equations for the `active` features, by Gaussian elimination (3 unknowns at most)."""
    k = len(active)
    # Features differ by orders of magnitude (1, hundreds of rows, millions of pairs): scale each to 1.
    scale = [max(abs(x[j]) for x, _ in samples) or 1.0 for j in active]
    a = [[0.0] * (k + 1) for _ in range(k)]
    for (x, y), w in zip(samples, weights, strict=True):
        row = [x[j] / s for j, s in zip(active, scale, strict=True)]
        for p in range(k):
            for q in range(k):
                a[p][q] += w * row[p] * row[q]
            a[p][k] += w * row[p] * y
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12 * max(1.0, sum(weights)):
            return None  # e.g. every step had the same shape so far
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(k):
            if r != col:
                factor = a[r][col] / a[col][col]
                for c in range(col, k + 1):
                    a[r][c] -= factor * a[col][c]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]
