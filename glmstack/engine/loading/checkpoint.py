"""Opening and loading checkpoints: safetensors (single or sharded), GGUF, and legacy `.bin`.

Pickle is never executed: `.bin` files go through `torch.load(weights_only=True)` on a torch whose
weights-only unpickler is safe, never through plain pickle. Safetensors headers, GGUF structure, shard indexes
and the config's declared sizes are all checked before a model is built or a tensor read, and nothing from a
checkpoint folder is ever imported. Weights are created on the meta device and replaced tensor by tensor, so a
9B model never exists twice in memory.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from gguf import GGMLQuantizationType
from torch import nn

from glmstack.engine.errors import ModelFileError, ModelNotFoundError, UnsupportedArchitectureError
from glmstack.engine.loading.config_checks import check_declared_sizes
from glmstack.engine.loading.gguf_file import GGUFFile, GGUFTensorInfo
from glmstack.engine.loading.json_files import read_json
from glmstack.engine.loading.quantized_checkpoint import load_saved_quantized, saved_quantization
from glmstack.engine.loading.safetensors_file import (
    TORCH_DTYPES,
    data_start,
    read_tensor,
    validate_safetensors_header,
)
from glmstack.engine.models import registry
from glmstack.engine.quant.int4 import DEFAULT_GROUP_SIZE, Int4Weights, PackedInt4
from glmstack.engine.quant.int8 import Int8Weights
from glmstack.engine.quant.on_load import LoadQuantizer, join_quantized
from glmstack.engine.quant.prequantized import GGUF_NATIVE_BITS

log = logging.getLogger(__name__)


# torch.load(weights_only=True) could still be made to run code before 2.6 (CVE-2025-32434).
SAFE_TORCH_LOAD = (2, 6)
# A renamer may return "<parameter>#<piece>": that tensor is one piece of a parameter the checkpoint stores
# split, and the model's join_pieces(parameter, {piece: tensor}) builds the parameter once it has them all.
PIECE_SEPARATOR = "#"


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


def pick_dtype(dtype: str | torch.dtype, device: torch.device, stored: torch.dtype | None = None) -> torch.dtype:
    """The dtype a model computes in. "auto": bf16 (or fp16 where the GPU lacks bf16) on GPUs; on CPU, a
    checkpoint stored in 16 bits stays 16-bit (as bf16) where the CPU multiplies bf16 natively (AVX512-BF16,
    AMX), rather than doubling its memory in fp32; fp32 otherwise (fp32 checkpoints, quantized blocks
    dequantized, CPUs without bf16 arithmetic)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    named = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype in named:
        return named[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if stored in (torch.bfloat16, torch.float16) and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo,
    so False where that is missing)."""
    if not _cpu_flags:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            flags = ""
        _cpu_flags.append(set(flags.split()))
    return bool(_cpu_flags[0] & {"avx512_bf16", "amx_bf16"})


_cpu_flags: list[set[str]] = []


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
    """What `path` holds, validated: every file header checked against the bytes there, and the config's
    declared sizes checked against caps and the tensor shapes, all before a model is built or a byte of
    tensor data is read."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return _open_gguf(path)
        if path.suffix == ".safetensors":
            return _open_safetensors(path, read_json(path.parent / "config.json"), [path])
        raise ModelFileError(
            path, "not a model file (expected a .gguf, .safetensors, or a checkpoint folder)"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} does not exist")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return _open_gguf(ggufs[0])
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFileError(path, "folder has no config.json and no single .gguf file")
    config = read_json(config_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _weight_map(index)
        ckpt = _open_safetensors(path, config, _shards(index, weight_map))
        _check_index_matches(index, weight_map, ckpt.extras["headers"])
        return ckpt
    single = path / "model.safetensors"
    if single.is_file():
        return _open_safetensors(path, config, [single])
    others = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if others:
        return _open_safetensors(path, config, others)
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():  # ChatGLM-6B's pytorch_model-0000N-of-00008.bin
        weight_map = _weight_map(bin_index)
        check_declared_sizes(config_path, config, names=weight_map)
        return Checkpoint(path, "bin", config, _shards(bin_index, weight_map))
    bins = sorted(p for p in path.glob("pytorch_model*.bin") if p.is_file())
    if bins:
        check_declared_sizes(config_path, config)  # the shapes are inside the pickles: caps only
        return Checkpoint(path, "bin", config, bins)
    raise ModelFileError(
        path, "no weights found (model.safetensors, *.safetensors, pytorch_model*.bin or .gguf)"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(index, "index has no weight_map", field="weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ModelFileError(
                index, f"weight_map[{name!r}] is {shard!r}, not a file name", field="weight_map"
            )
    return weight_map


def _shards(index: Path, weight_map: dict[str, str]) -> list[Path]:
    shards = []
    for shard in sorted(set(weight_map.values())):
        # A plain file name in this folder: no separators, no "..", nothing absolute. (A symlink is fine, as
        # in the Hugging Face cache; it must lead to a regular file, not a device or a folder.)
        if shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise ModelFileError(
                index, f"shard {shard!r} points outside the checkpoint folder", field="weight_map"
            )
        shard_path = index.parent / shard
        if not shard_path.is_file():
            raise ModelFileError(
                index,
                f"shard {shard} listed in the index is missing or not a regular file",
                field="weight_map",
            )
        shards.append(shard_path)
    return shards


def _check_index_matches(
    index: Path, weight_map: dict[str, str], headers: dict[Path, dict[str, Any]]
) -> None:
    held = {
        name: shard.name for shard, header in headers.items() for name in header if name != "__metadata__"
    }
    for name, shard in weight_map.items():
        if held.get(name) != shard:
            raise ModelFileError(
                index,
                f"weight_map puts {name} in {shard}, but that shard does not hold it",
                field="weight_map",
            )


def _open_gguf(path: Path) -> Checkpoint:
    gguf = GGUFFile(path)  # validates every count, length and offset before anything else reads the file
    try:
        arch = gguf.metadata.get("general.architecture")
        shapes = {t.name: t.shape for t in gguf.tensors}
        check_declared_sizes(path, gguf.metadata, gguf_arch=str(arch), shapes=shapes)
    except ModelFileError:
        gguf.close()
        raise
    return Checkpoint(path, "gguf", gguf.metadata, [path], gguf=gguf)


def _open_safetensors(path: Path, config: dict[str, Any], shards: list[Path]) -> Checkpoint:
    headers = {shard: validate_safetensors_header(shard) for shard in shards}
    shapes: dict[str, tuple[int, ...]] = {}
    for shard, header in headers.items():
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in shapes:
                raise ModelFileError(shard, f"tensor {name} is also in another shard", field=name)
            shapes[name] = tuple(info["shape"])
    config_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    check_declared_sizes(config_path, config, shapes=shapes)
    return Checkpoint(path, "safetensors", config, shards, extras={"headers": headers})


# ---- tensors -------------------------------------------------------------------------------------------


def torch_load_is_safe() -> bool:
    """Whether this torch's weights-only unpickler is trusted with hostile files (see SAFE_TORCH_LOAD)."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return found is not None and (int(found.group(1)), int(found.group(2))) >= SAFE_TORCH_LOAD


def load_bin(shard: Path) -> dict[str, torch.Tensor]:
    """A legacy pickle checkpoint's tensors, through torch's weights-only unpickler and nothing else."""
    if not torch_load_is_safe():
        floor = ".".join(map(str, SAFE_TORCH_LOAD))
        raise ModelFileError(
            shard,
            f"refusing to unpickle with torch {torch.__version__}: weights-only loading is only safe from "
            f"torch {floor} (CVE-2025-32434); upgrade torch",
        )
    try:
        # weights_only: tensors and plain containers only — a pickle cannot run code here. Zip checkpoints
        # (torch >= 1.6, ChatGLM-6B's) are memory-mapped; the older flat format cannot be.
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(shard))
    except Exception as exc:
        raise ModelFileError(
            shard, f"cannot load as a weights-only checkpoint ({_load_problem(exc)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelFileError(shard, "checkpoint is not a dict of tensors")
    return {name: tensor for name, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def _load_problem(exc: Exception) -> str:
    """The line of torch's error that says what was wrong, without its advice to retry unsafely."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    found = re.search(r"(GLOBAL \S+|operand \d+)", text)
    return f"the weights-only unpickler refused {found.group(1) if found else 'its contents'}"


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) pairs; loaders are lazy so the caller controls peak memory and shows progress. Each
    loader returns a fresh tensor and leaves nothing of the file mapped or resident (see
    `safetensors_file.read_tensor`, `GGUFFile.release`)."""
    if ckpt.format == "safetensors":
        headers = ckpt.extras.get("headers", {})
        for shard in ckpt.files:
            header = headers.get(shard) or validate_safetensors_header(shard)
            start = data_start(shard)
            for name, info in header.items():
                if name != "__metadata__":
                    yield name, (lambda s=shard, i=info, b=start: _read_safetensors(s, i, b))
    elif ckpt.format == "bin":
        for shard in ckpt.files:
            for name, tensor in load_bin(shard).items():
                yield name, (lambda t=tensor: t)
    else:
        assert ckpt.gguf is not None
        for info in ckpt.gguf.tensors:
            yield info.name, (lambda i=info: _read_gguf(ckpt.gguf, i))


def _read_safetensors(shard: Path, info: dict[str, Any], start: int) -> torch.Tensor:
    with open(shard, "rb") as f:
        return read_tensor(f, info, start)


def _read_gguf(gguf: GGUFFile, info: GGUFTensorInfo) -> torch.Tensor:
    tensor = gguf.load(info)  # a copy (dequantized or widened)
    gguf.release(info)
    return tensor


# ---- building the model --------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    module: nn.Module
    arch_module: ModuleType
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    # With quantize=: linear name -> its quantized module, made as the loader read the weight. Those linears'
    # float weights stay on the meta device until `quantize_model(..., prequantized=...)` swaps them in.
    prequantized: dict[str, nn.Module] = field(default_factory=dict)


def resolve_architecture(ckpt: Checkpoint) -> ModuleType:
    """The file of glmstack/engine/models/ that reads this checkpoint."""
    if ckpt.format == "gguf":
        return registry.resolve_gguf(str(ckpt.config.get("general.architecture", "")))
    return registry.resolve_hf(ckpt.config)


def build_model(ckpt: Checkpoint) -> tuple[ModuleType, nn.Module]:
    """Instantiate the right architecture on the meta device (no memory, no random init)."""
    arch_module = resolve_architecture(ckpt)
    if ckpt.format == "gguf":
        arch = str(ckpt.config.get("general.architecture", ""))
        # name -> shape; models test membership ("has a bias?") and read shapes the metadata omits
        tensor_names = {t.name: t.shape for t in ckpt.gguf.tensors}
        config = arch_module.Model.config_class.from_gguf(ckpt.config, arch, tensor_names)
    else:
        config = arch_module.Model.config_class.from_hf(ckpt.config)
    with torch.device("meta"):
        model = arch_module.Model(config)
    return arch_module, model


def stored_precision(ckpt: Checkpoint) -> str | None:
    """The weight-only quantization a checkpoint is stored in, which `quantize="auto"` keeps: the precision
    recorded by `glmstack quantize`; for a GGUF, what its decoder-layer weights mostly map to (Q4_0, Q4_1 and
    Q4_K -> "int4": the same 32-weight groups, scales and offsets; 5- to 8-bit blocks -> "int8"); None for
    floats."""
    recorded = saved_quantization(ckpt.config)
    if recorded is not None:
        return f"int{recorded['bits']}"
    if ckpt.gguf is None:
        return None
    stored: Counter[GGMLQuantizationType] = Counter()
    for info in ckpt.gguf.tensors:
        if info.name.startswith("blk.") and len(info.shape) == 2:
            stored[info.type] += info.n_elements
    if not stored:
        return None
    bits = GGUF_NATIVE_BITS.get(stored.most_common(1)[0][0])
    return None if bits is None else f"int{bits}"


def stored_dtype(ckpt: Checkpoint) -> torch.dtype | None:
    """The floating dtype most of a checkpoint's weights are stored in (None: quantized blocks, or unknown)."""
    counts: Counter[torch.dtype] = Counter()
    if ckpt.gguf is not None:
        names = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                 GGMLQuantizationType.BF16: torch.bfloat16}
        for info in ckpt.gguf.tensors:
            counts[names.get(info.type, torch.uint8)] += info.n_elements
    elif ckpt.format == "safetensors":
        for header in ckpt.extras.get("headers", {}).values():
            for name, info in header.items():
                if name != "__metadata__":
                    counts[TORCH_DTYPES[info["dtype"]]] += math.prod(info["shape"])
    else:
        declared = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        return declared.get(str(ckpt.config.get("torch_dtype")))
    if not counts:
        return None
    dtype = counts.most_common(1)[0][0]
    return dtype if dtype.is_floating_point else None


def load_model(
    path: Path | Checkpoint,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    progress: bool = False,
    quantize: int = 0,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> LoadedModel:
    """Build the model and fill in its weights, tensor by tensor.

    `quantize` (8 or 4): the linears `quantize_model(bits=quantize)` would replace are quantized as they are
    read (`quant/on_load.py`), so the whole model never exists in floats; a GGUF's blocks go in as they are
    where they map onto a kernel's grid. They are returned as `prequantized` modules, and their float weights
    stay on the meta device until `quantize_model(..., prequantized=...)` installs them (the caller must)."""
    started = time.perf_counter()
    target_device = pick_device(device)
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    target_dtype = pick_dtype(dtype, target_device, stored=stored_dtype(ckpt))
    try:
        arch_module, model = build_model(ckpt)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, UnsupportedArchitectureError):
            raise
        raise ModelFileError(ckpt.path, f"config is missing or has an invalid field: {exc}") from None
    if saved_quantization(ckpt.config) is not None:  # written by `glmstack quantize`: the kernels' own forms
        if dtype == "auto" and target_device.type == "cpu":
            target_dtype = torch.bfloat16  # what its floats were saved in, and what the quantized kernels take
        return load_saved_quantized(ckpt, arch_module, model, target_device, target_dtype, started, progress)
    quantizer = LoadQuantizer(model, quantize, group_size, target_device, target_dtype) if quantize else None
    expected = dict(model.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    rename = model.gguf_tensor_name if ckpt.format == "gguf" else model.hf_tensor_name
    pieces: dict[str, dict[str, Any]] = {}
    prequantized: dict[str, nn.Module] = {}
    gguf_infos = {info.name: info for info in ckpt.gguf.tensors} if ckpt.gguf is not None else {}
    tensors = list(iter_tensors(ckpt))
    bar = progress_bar(len(tensors), f"Loading {ckpt.path.name}", progress)
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
            full_name = f"{name}{PIECE_SEPARATOR}{piece}" if piece else name
            target = quantizer.target(name) if quantizer is not None else None
            tensor: Any = None
            if target is not None and raw_name in gguf_infos:
                assert quantizer is not None and ckpt.gguf is not None
                tensor = quantizer.from_gguf(ckpt.gguf, gguf_infos[raw_name], target[1])
                if tensor is not None:  # the file's own blocks; the model's row fix-ups apply to them too
                    tensor = tensor.map_rows(lambda rows, n=full_name: model.from_gguf_tensor(n, rows))
            if tensor is None:
                tensor = load()
                if ckpt.format == "gguf":
                    tensor = model.from_gguf_tensor(full_name, tensor)
                if target is not None:
                    assert quantizer is not None
                    _check_columns(ckpt, raw_name, tensor, expected[name])
                    tensor = quantizer.from_float(target[0], tensor, target[1], target[2], whole=not piece)
            if piece:
                # One of our parameters stored as several tensors (transformers' q_proj/k_proj/v_proj for a
                # fused query_key_value): gather them; the model joins them once all are there.
                pieces.setdefault(name, {})[piece] = tensor
                joined = (join_quantized(model, name, pieces[name]) if target is not None
                          else model.join_pieces(name, pieces[name]))
                if joined is None:
                    continue
                del pieces[name]
                tensor = joined
            shape = tuple(tensor.shape if isinstance(tensor, PackedInt4) else
                          (tensor.codes if isinstance(tensor, Int4Weights) else
                           tensor.weight if isinstance(tensor, Int8Weights) else tensor).shape)
            if shape != tuple(expected[name].shape):
                raise ModelFileError(ckpt.path, f"tensor {raw_name} has shape {shape}, the config implies "
                                                f"{tuple(expected[name].shape)}")
            if target is not None:
                assert quantizer is not None
                prequantized[target[0]] = quantizer.build(target[0], tensor)
                del tensor
                if math.prod(expected[name].shape) >= 1 << 23:
                    return_freed_memory()  # before the next big tensor is read, or the heap's slack adds to the peak
                continue
            loaded[name] = tensor.to(device=target_device, dtype=target_dtype)
    finally:
        bar.close()
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = getattr(model, "output_weight_name", "lm_head.weight")  # what tie_weights() fills when tied
    kept = {f"{module}.weight" for module in prequantized}
    missing = [n for n in expected if n not in loaded and n not in kept and not (tied and n == head)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelFileError(
            ckpt.path, f"checkpoint is missing {len(missing)} tensors the config requires: {shown}"
        )
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.init_buffers(target_device)
    model.eval()
    del tensors, loaded
    _close(ckpt)
    return LoadedModel(model, arch_module, ckpt, target_device, target_dtype, time.perf_counter() - started,
                       prequantized)


def _check_columns(ckpt: Checkpoint, raw_name: str, tensor: torch.Tensor, want: torch.Tensor) -> None:
    """A weight about to be quantized must have its linear's input size (its rows are checked once joined)."""
    if tensor.dim() != 2 or tensor.shape[1] != want.shape[1]:
        raise ModelFileError(ckpt.path, f"tensor {raw_name} has shape {tuple(tensor.shape)}, the config "
                                        f"implies {tuple(want.shape)}")


def _close(ckpt: Checkpoint) -> None:
    if ckpt.gguf is not None:
        # Every tensor is a copy by now: nothing of the file stays mapped.
        try:
            ckpt.gguf.close()
        except BufferError:  # a view into the mapping is still alive somewhere: it stays mapped, harmless
            log.debug("%s: still mapped after loading", ckpt.path)


def return_freed_memory() -> None:
    """Loading frees gigabytes of temporaries (each tensor as read, dequantized blocks, floats before
    quantizing); glibc keeps much of it in its heap, counted in RSS, unless asked to give it back."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, dynamic_ncols=True)
