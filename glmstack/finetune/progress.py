"""What a training run tells the outside: the events file, the progress bar, the loss curve.

The events file (`--events`, default OUTPUT/events.jsonl) is the contract with the platform's job runner,
which follows it to report a job's events: one JSON object per line, appended and flushed as it happens,

    {"type": "step", "step", "total_steps", "trained_tokens", "epoch", "loss", "learning_rate", "tokens_per_s",
     "elapsed_s", "eta_s"}
    {"type": "validation", "step", "loss"}
    {"type": "checkpoint", "step", "path"}
    {"type": "done", "adapter_dir", "steps", "train_loss", "trained_tokens"}
    {"type": "error", "message"}

`step` counts optimizer steps from 1; `epoch` is fractional (1.5 = halfway through the second epoch);
`tokens_per_s` counts every non-padding token the step processed, over all processes; `trained_tokens` those
tokens over the whole run so far, kept across a resume (what the platform bills training by: every token of
every example seen, not only the loss-bearing ones). A resumed run appends
to the same file, so the steps after the checkpoint it resumed from appear twice: a reader keeps the last
record of each step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw

from glmstack.durable import fsync_file


class EventLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = open(path, "a", encoding="utf-8")

    def write(self, kind: str, **fields: Any) -> None:
        self._file.write(json.dumps({"type": kind, **fields}, ensure_ascii=False) + "\n")
        self._file.flush()  # a follower sees each event as it happens

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            fsync_file(self.path)


class ProgressBar:
    """tqdm on a terminal (loss, tokens/s and ETA in its postfix); nothing otherwise - the events file is
    the record, and a job's captured stderr has no use for carriage returns."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, loss: float, tokens_per_s: float, eta_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", eta=_clock(eta_s),
                                  refresh=False)
            self._bar.update(1)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---- the loss curve ---------------------------------------------------------------------------------

WIDTH, HEIGHT, MARGIN = 800, 480, 60
TRAIN_COLOUR, VALIDATION_COLOUR, AXIS_COLOUR = (31, 119, 180), (214, 39, 40), (80, 80, 80)


def plot_losses(path: Path, train: list[tuple[int, float]], validation: list[tuple[int, float]]) -> None:
    """loss.png: training loss per step (blue line) and validation loss (red points) against the step.
    Drawn with Pillow, already a dependency, rather than bringing matplotlib in for one line chart."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = [p for p in [*train, *validation] if math.isfinite(p[1])]
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS_COLOUR, width=2)
    draw.text((left, 8), "loss (blue: training, red: validation)", fill=AXIS_COLOUR)
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        low_step, high_step = min(steps), max(max(steps), min(steps) + 1)
        low, high = min(losses), max(losses)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5

        def xy(step: int, loss: float) -> tuple[float, float]:
            x = left + (step - low_step) / (high_step - low_step) * (right - left)
            return x, bottom - (loss - low) / (high - low) * (bottom - top)

        for value in (low, (low + high) / 2, high):  # three labelled ticks on each axis
            y = xy(low_step, value)[1]
            draw.line([(left - 5, y), (left, y)], fill=AXIS_COLOUR)
            draw.text((4, y - 6), f"{value:.3g}", fill=AXIS_COLOUR)
        for step in (low_step, (low_step + high_step) // 2, high_step):
            x = xy(step, low)[0]
            draw.line([(x, bottom), (x, bottom + 5)], fill=AXIS_COLOUR)
            draw.text((x - 10, bottom + 8), str(step), fill=AXIS_COLOUR)
        draw.text((right - 40, bottom + 24), "step", fill=AXIS_COLOUR)
        line = [xy(s, v) for s, v in train if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=TRAIN_COLOUR, width=2)
        for s, v in [*train[:1], *validation]:
            if math.isfinite(v):
                x, y = xy(s, v)
                colour = VALIDATION_COLOUR if (s, v) in validation else TRAIN_COLOUR
                draw.ellipse([(x - 3, y - 3), (x + 3, y + 3)], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
