"""`glmstack convert SRC DST`: rewrite a legacy `.bin` (pickle) checkpoint folder as safetensors.

The pickles are read the only way glmstack reads them (`torch.load(weights_only=True)`, see `load_bin`), one
shard at a time, and written as safetensors shards of the same split, with a `model.safetensors.index.json`
when there is more than one. Config and tokenizer files are copied; other pickles (`training_args.bin`,
`*.pt`) are left behind. The result is built in a temporary folder next to DST and renamed into place, so DST
either does not exist or is complete. An existing DST is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.checkpoint import load_bin, open_checkpoint, validate_safetensors_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SKIPPED_FILES = {"pytorch_model.bin.index.json"}


def convert_checkpoint(src: Path, dst: Path) -> Path:
    """Write SRC's `.bin` checkpoint as safetensors in the new folder DST; returns DST."""
    src, dst = Path(src), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"{dst} already exists; refusing to overwrite it")
    ckpt = open_checkpoint(src)  # validates config.json, the index and shard names
    if ckpt.format != "bin":
        raise ModelFileError(
            src, f"is already a {ckpt.format} checkpoint; only .bin checkpoints are converted"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    work.mkdir()
    try:
        weight_map = _write_shards(ckpt.files, work)
        for path in sorted(src.iterdir()):
            if path.is_file() and path.suffix not in PICKLE_SUFFIXES and path.name not in SKIPPED_FILES:
                shutil.copyfile(path, work / path.name)  # contents only (the Hugging Face cache links files)
            elif path.is_dir() and not path.name.startswith("."):
                # a sentence-transformers folder's module configs (1_Pooling/, 2_Normalize/), never pickles
                shutil.copytree(path, work / path.name, copy_function=shutil.copyfile,
                                ignore=shutil.ignore_patterns(*(f"*{suffix}" for suffix in PICKLE_SUFFIXES)))
        if len(ckpt.files) > 1:
            index = {"metadata": {"converted_from": "pytorch_model.bin"}, "weight_map": weight_map}
            (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        for shard in sorted(set(weight_map.values())):
            validate_safetensors_header(work / shard)  # what we wrote must pass what we will read
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dst


def _write_shards(shards: list[Path], out: Path) -> dict[str, str]:
    """One safetensors file per pickle shard; returns tensor name -> file name."""
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        )
        tensors = _unshared(load_bin(shard))
        for tensor_name in tensors:
            if tensor_name in weight_map:
                raise ModelFileError(shard, f"tensor {tensor_name} is also in {weight_map[tensor_name]}")
            weight_map[tensor_name] = name
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    return weight_map


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Safetensors stores each tensor on its own: copy any that share storage (tied weights, views) or are
    not contiguous; leave the rest as they are (memory-mapped, not yet read)."""
    users: dict[int, int] = {}
    for tensor in state.values():
        ptr = tensor.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    out = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage()
        whole = (
            tensor.is_contiguous() and tensor.nbytes == storage.nbytes() and users[storage.data_ptr()] == 1
        )
        out[name] = tensor if whole else tensor.contiguous().clone()
    return out
