"""Training checkpoints: everything an exact resume needs, written whole or not at all.

OUTPUT/checkpoints/step-000120/
    adapter_config.json, adapter_model.safetensors   the adapter so far (usable on its own)
    state.pt    the method's trainable tensors, the optimizer's and the schedule's state, the step (which is
                the data position: batches are a function of seed, epoch and step, see trainer.py), the loss
                history, and the RNG states

Each is written into a temporary sibling folder, fsync'ed, and renamed into place, so kill -9 at any moment
leaves the previous checkpoint intact; older checkpoints are removed once a newer one is in place.
`state.pt` holds only tensors and plain containers and is read back with torch's weights-only unpickler.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glmstack.durable import fsync_file, replace_directory

STATE_NAME = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output: Path) -> Path:
    return output / "checkpoints"


def save_checkpoint(output: Path, step: int, state: dict[str, Any],
                    write_adapter: Callable[[Path], None]) -> Path:
    """Write checkpoint `step` (state.pt + the adapter via `write_adapter(folder)`); returns its folder."""
    folder = checkpoints_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    try:
        write_adapter(staging / "adapter")
        for path in (staging / "adapter").iterdir():
            shutil.move(str(path), staging / path.name)
        (staging / "adapter").rmdir()
        torch.save(state, staging / STATE_NAME)
        for path in staging.iterdir():
            fsync_file(path)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for older in folder.iterdir():
        found = _STEP_DIR.match(older.name)
        if found and int(found.group(1)) < step:
            shutil.rmtree(older, ignore_errors=True)
    return target


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint in OUTPUT (temporary folders of an interrupted write are ignored)."""
    folder = checkpoints_dir(output)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    return state
