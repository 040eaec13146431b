"""A validating reader for safetensors headers.

The header (u64 length, then JSON) is checked against the file before the safetensors library maps it: its
length, JSON that cannot exhaust the stack, known dtypes, shapes whose element count is capped, and offsets
that tile the data section exactly, as the format requires. Anything else is a `ModelFileError` naming the
file, the tensor and the byte offset.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading.json_files import parse_json

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U16": torch.uint16,
    "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit
MAX_SAFETENSORS_DIMS = 8
MAX_TENSOR_ELEMENTS = 1 << 40


def validate_safetensors_header(path: Path) -> dict[str, Any]:
    """Check the header against the file before memory-mapping it: lengths, dtypes, shapes, offsets, and that
    the tensors tile the data section exactly, as the format requires."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ModelFileError(path, f"file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len == 0 or header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            limit = "is zero" if header_len == 0 else f"is larger than the file ({size} bytes) allows"
            raise ModelFileError(path, f"header length {header_len} {limit}", field="header_len", offset=0)
        header = parse_json(path, f.read(header_len), "header", offset=8)
    if not isinstance(header, dict):
        raise ModelFileError(path, "header is not a JSON object", offset=8)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(path, "__metadata__ is not a map of strings", field="__metadata__", offset=8)
    data_start = 8 + header_len
    data_size = size - data_start
    spans = []
    for name, info in header.items():
        if name != "__metadata__":
            spans.append((*_tensor_span(path, name, info, data_start, data_size), name))
    spans.sort()
    covered = 0
    for begin, end, name in spans:
        if begin < covered:
            raise ModelFileError(
                path, f"tensor {name} overlaps the tensor before it", field=name, offset=data_start + begin
            )
        if begin > covered:
            raise ModelFileError(
                path,
                f"bytes {covered}..{begin} of the data belong to no tensor",
                field=name,
                offset=data_start + covered,
            )
        covered = end
    if covered != data_size:
        raise ModelFileError(
            path,
            f"{data_size - covered} bytes after the last tensor belong to no tensor",
            offset=data_start + covered,
        )
    return header


def _tensor_span(path: Path, name: str, info: Any, data_start: int, data_size: int) -> tuple[int, int]:
    """A header entry's (begin, end) in the data section, once its dtype, shape and offsets add up."""
    if not isinstance(info, dict):
        raise ModelFileError(path, f"tensor {name}: entry {info!r} is not an object", field=name, offset=8)
    if info.get("dtype") not in SAFETENSORS_DTYPES:
        raise ModelFileError(
            path, f"tensor {name}: unknown dtype {info.get('dtype')!r}", field=name, offset=8
        )
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_SAFETENSORS_DIMS and all(map(_is_size, shape))):
        raise ModelFileError(path, f"tensor {name}: invalid shape {shape!r}", field=name, offset=8)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))):
        raise ModelFileError(path, f"tensor {name}: invalid data_offsets {offsets!r}", field=name, offset=8)
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_TENSOR_ELEMENTS:
            raise ModelFileError(
                path,
                f"tensor {name}: shape {shape} has more than {MAX_TENSOR_ELEMENTS} elements",
                field=name,
                offset=8,
            )
    begin, end = offsets
    if not begin <= end <= data_size:
        raise ModelFileError(
            path,
            f"tensor {name}: data {begin}..{end} lies outside the file's {data_size} data bytes (truncated?)",
            field=name,
            offset=data_start + min(begin, data_size),
        )
    if end - begin != numel * SAFETENSORS_DTYPES[info["dtype"]]:
        raise ModelFileError(
            path,
            f"tensor {name}: {end - begin} bytes do not match shape {shape} of {info['dtype']}",
            field=name,
            offset=data_start + begin,
        )
    return begin, end


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def data_start(path: Path) -> int:
    """Where a (validated) safetensors file's data section begins: after the u64 length and the header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def read_tensor(f: Any, info: dict[str, Any], start: int) -> torch.Tensor:
    """One tensor of an open, validated safetensors file, read into fresh memory with plain file reads.

    Not through a memory map: every page of a mapped file the loader touches counts in the process's RSS until
    the map goes away, so loading a 9B bf16 checkpoint tensor by tensor would still peak at the file's size
    on top of the model. Read into our own buffer, the bytes pass through the page cache (the kernel's to
    reclaim) and the process holds only the tensors it keeps."""
    begin, end = info["data_offsets"]
    out = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(start + begin)
    view = out.numpy().data
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelFileError(Path(f.name), "file ended inside a tensor (changed while loading?)",
                                 offset=start + begin + done)
        done += n
    return out.view(TORCH_DTYPES[info["dtype"]]).reshape(info["shape"])
