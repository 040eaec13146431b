"""Adapter folders as PEFT writes them: `adapter_config.json` + `adapter_model.safetensors`, read and written
without importing peft (which imports transformers: seconds, and not something a server should carry).

Also read: THUDM's P-Tuning v2 checkpoints (ChatGLM's ptuning/main.py saves the whole model's trainable
state with `torch.save`: `pytorch_model.bin` holding `transformer.prefix_encoder.embedding.weight`), through
the loader's weights-only unpickler, and PEFT's older `adapter_model.bin`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from glmstack.durable import fsync_directory, fsync_file
from glmstack.engine.loading.checkpoint import load_bin

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read: what is missing or wrong, with the path."""


def read_adapter(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder. The config is adapter_config.json as written (PEFT's keys:
    peft_type, r, lora_alpha, target_modules, ...); a THUDM P-Tuning folder has none, so its config is
    made from the tensor and the folder's config.json: {"peft_type": "PREFIX_TUNING", "num_virtual_tokens",
    "prefix_projection"}."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterFileError(f"{folder}: not a directory")
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        tensors = load_file(str(weights))
    else:
        legacy = next((folder / name for name in LEGACY_WEIGHTS if (folder / name).is_file()), None)
        if legacy is None:
            raise AdapterFileError(f"{folder}: no {WEIGHTS_NAME} (nor {' / '.join(LEGACY_WEIGHTS)})")
        tensors = load_bin(legacy)
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        config = _read_json(config_path)
    else:
        config = _thudm_ptuning_config(folder, tensors)
    return config, tensors


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: cannot read ({e})") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return value


def _thudm_ptuning_config(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """THUDM's ptuning checkpoints carry the prefix table (or its projection MLP) under `prefix_encoder`;
    pre_seq_len and prefix_projection are in the config.json saved beside it, else read off the tensors."""
    prefix = {name: t for name, t in tensors.items() if "prefix_encoder." in name}
    if not prefix:
        raise AdapterFileError(f"{folder}: no {CONFIG_NAME}, and no prefix_encoder tensors of a P-Tuning v2 "
                               "checkpoint")
    model_config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    embedding = next((t for name, t in prefix.items() if name.endswith("prefix_encoder.embedding.weight")), None)
    pre_seq_len = model_config.get("pre_seq_len") or (None if embedding is None else embedding.shape[0])
    projection = model_config.get("prefix_projection")
    if projection is None:
        projection = any(".trans." in name for name in prefix)
    return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": pre_seq_len, "prefix_projection": bool(projection)}


def write_adapter(directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter folder: both files into a temporary sibling folder, each fsync'ed, then renamed into
    place. A new folder appears whole; into an existing one (a training run's output folder, which holds its
    checkpoints and events too) the weights are renamed in first and adapter_config.json last, so a folder
    with a config always has the weights that belong to it."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / CONFIG_NAME).write_text(
            json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n", encoding="utf-8")
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()},
                  str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fsync_file(staging / name)
        if not target.exists():
            os.replace(staging, target)
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(staging / name, target / name)
            staging.rmdir()
        fsync_directory(target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):  # PEFT keeps target_modules as a set
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
