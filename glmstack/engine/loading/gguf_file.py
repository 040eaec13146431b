"""A validating GGUF reader.

Every count, length, offset and dimension in the file is checked against the bytes actually there before it
is used, so a hostile or truncated file is refused with a `ModelFileError` naming the field and byte offset,
instead of hanging, exhausting memory or reading out of bounds. (The `gguf` package's own reader trusts its
input and is slow on large tokenizer arrays; we use that package only for its type tables and dequantizers.)

Layout (GGUF v2/v3, little endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv pairs,
tensor infos, padding to `general.alignment`, tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from glmstack.engine.errors import ModelFileError

# Sanity caps. Real files are far below these; hostile ones are refused before allocating anything.
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_STRING = 64 * 1024 * 1024
MAX_ARRAY_LENGTH = 1 << 24  # a 256k vocabulary's merges are ~300k strings
MAX_ARRAY_NESTING = 2
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 40
MAX_ALIGNMENT = 1 << 16

_SCALARS = {  # GGUF value type -> (struct format, size, numpy dtype)
    0: ("<B", 1, np.uint8),
    1: ("<b", 1, np.int8),
    2: ("<H", 2, np.uint16),
    3: ("<h", 2, np.int16),
    4: ("<I", 4, np.uint32),
    5: ("<i", 4, np.int32),
    6: ("<f", 4, np.float32),
    7: ("<?", 1, np.bool_),
    10: ("<Q", 8, np.uint64),
    11: ("<q", 8, np.int64),
    12: ("<d", 8, np.float64),
}
_STRING, _ARRAY = 8, 9
# The fewest bytes a key/value pair (key length, type, a one-byte value) and a tensor info (name length,
# n_dims, one dim, type, offset) can take: counts needing more than the file holds are refused before the
# loops that would believe them.
_MIN_KV_BYTES, _MIN_TENSOR_INFO_BYTES = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first): the reverse of GGUF's ne[]
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        if self.size < 24:
            raise ModelFileError(self.path, f"file is {self.size} bytes, too short for a GGUF header")
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: list[GGUFTensorInfo] = []
        try:
            self._parse()
        except BaseException:
            self._map.close()  # a refused file leaves no mapping (or file handle) behind
            raise

    # ---- low-level reads, each bounds-checked ----------------------------------------------------------

    def _fail(self, problem: str, field: str | None = None, offset: int | None = None) -> ModelFileError:
        return ModelFileError(self.path, problem, field=field, offset=self._pos if offset is None else offset)

    def _need(self, n: int, field: str) -> None:
        if n < 0 or self._pos + n > self.size:
            raise self._fail(f"needs {n} bytes but only {self.size - self._pos} remain (truncated?)", field)

    def _scalar(self, vtype: int, field: str) -> Any:
        fmt, size, _ = _SCALARS[vtype]
        self._need(size, field)
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += size
        return value

    def _u32(self, field: str) -> int:
        return int(self._scalar(4, field))

    def _u64(self, field: str) -> int:
        return int(self._scalar(10, field))

    def _string(self, field: str) -> str:
        start = self._pos
        length = self._u64(field)
        if length > MAX_STRING:
            raise self._fail(f"string length {length} exceeds the {MAX_STRING}-byte cap", field, start)
        self._need(length, field)
        raw = self._map[self._pos : self._pos + length]
        self._pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int, field: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self._scalar(vtype, field)
        if vtype == _STRING:
            return self._string(field)
        if vtype != _ARRAY:
            raise self._fail(f"unknown value type {vtype}", field)
        if depth >= MAX_ARRAY_NESTING:
            raise self._fail(f"arrays nested deeper than {MAX_ARRAY_NESTING}", field)
        start = self._pos
        item_type = self._u32(field)
        count = self._u64(field)
        if count > MAX_ARRAY_LENGTH:
            raise self._fail(f"array of {count} items exceeds the cap of {MAX_ARRAY_LENGTH}", field, start)
        if item_type in _SCALARS:
            _, size, dtype = _SCALARS[item_type]
            if count > (self.size - self._pos) // size:
                raise self._fail(f"array of {count} items does not fit in the file", field, start)
            values = np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).tolist()
            self._pos += count * size
            return values
        # strings need at least 8 bytes each, nested arrays at least 12: a count past that is a lie
        min_size = 8 if item_type == _STRING else 12
        if count > (self.size - self._pos) // min_size:
            raise self._fail(f"array of {count} items does not fit in the file", field, start)
        if item_type == _STRING:
            return [self._string(field) for _ in range(count)]
        return [self._value(item_type, field, depth + 1) for _ in range(count)]

    # ---- structure -------------------------------------------------------------------------------------

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise self._fail("not a GGUF file (bad magic)", "magic", 0)
        self._pos = 4
        self.version = self._u32("version")
        if self.version not in (2, 3):
            raise self._fail(f"unsupported GGUF version {self.version}", "version", 4)
        tensor_count, kv_count = self._u64("tensor_count"), self._u64("kv_count")
        if tensor_count > MAX_TENSORS:
            raise self._fail(
                f"tensor_count {tensor_count} exceeds the cap of {MAX_TENSORS}", "tensor_count", 8
            )
        if kv_count > MAX_KV:
            raise self._fail(f"kv_count {kv_count} exceeds the cap of {MAX_KV}", "kv_count", 16)
        left = self.size - self._pos
        if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > left:
            field = "kv_count" if kv_count * _MIN_KV_BYTES > left else "tensor_count"
            raise self._fail(
                f"{tensor_count} tensors and {kv_count} metadata entries cannot fit in the {left} "
                "bytes after the header (truncated?)",
                field,
                16 if field == "kv_count" else 8,
            )
        for _ in range(kv_count):
            key = self._string("metadata key")
            vtype = self._u32(key)
            if key in self.metadata:
                raise self._fail(f"duplicate metadata key {key!r}", key)
            self.metadata[key] = self._value(vtype, key)
        alignment = self.metadata.get("general.alignment", 32)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or not 0 < alignment <= MAX_ALIGNMENT
            or alignment & (alignment - 1)
        ):
            raise self._fail(
                f"general.alignment {alignment!r} is not a power of two <= {MAX_ALIGNMENT}",
                "general.alignment",
            )
        infos = [self._tensor_info(i) for i in range(tensor_count)]
        data_start = (self._pos + alignment - 1) // alignment * alignment
        names: set[str] = set()
        for name, shape, qtype, rel_offset, n_bytes in infos:
            if name in names:
                raise self._fail(f"duplicate tensor {name!r}", name)
            names.add(name)
            if rel_offset % alignment:
                raise self._fail(f"tensor {name} offset {rel_offset} is not aligned to {alignment}", name)
            offset = data_start + rel_offset
            if offset + n_bytes > self.size:
                raise self._fail(
                    f"tensor {name} data ends at byte {offset + n_bytes}, past the end of the file "
                    f"({self.size} bytes): file is truncated",
                    name,
                    offset,
                )
            self.tensors.append(GGUFTensorInfo(name, shape, qtype, offset, n_bytes))
        spans = sorted(self.tensors, key=lambda t: t.offset)
        for a, b in zip(spans, spans[1:], strict=False):
            if b.offset < a.offset + a.n_bytes:
                raise self._fail(f"tensors {a.name} and {b.name} overlap", b.name, b.offset)

    def _tensor_info(self, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int, int]:
        start = self._pos
        name = self._string(f"tensor[{index}].name")
        n_dims = self._u32(f"{name}.n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name} has n_dims={n_dims} (1..{MAX_DIMS} allowed)", name, start)
        dims = [self._u64(f"{name}.dims") for _ in range(n_dims)]
        n_elements = 1
        for d in dims:
            if d == 0 or d > MAX_ELEMENTS:
                raise self._fail(f"tensor {name} has dimension {d}", name, start)
            n_elements *= d
            if n_elements > MAX_ELEMENTS:
                raise self._fail(f"tensor {name} has {n_elements}+ elements, beyond the cap", name, start)
        raw_type = self._u32(f"{name}.type")
        try:
            qtype = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self._fail(f"tensor {name} has unknown type {raw_type}", name, start) from None
        if dims[0] % block:
            raise self._fail(
                f"tensor {name}: row of {dims[0]} is not a multiple of the {qtype.name} block size {block}",
                name,
                start,
            )
        offset = self._u64(f"{name}.offset")
        return name, tuple(reversed(dims)), qtype, offset, n_elements // block * type_size

    # ---- tensor data -----------------------------------------------------------------------------------

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the mapped file."""
        return np.frombuffer(self._map, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def load(self, info: GGUFTensorInfo) -> torch.Tensor:
        """Dequantized float32 tensor (F16/BF16 widened exactly)."""
        data = self.raw(info)
        if info.type == GGMLQuantizationType.F32:
            array = data.view(np.float32).reshape(info.shape).copy()
            return torch.from_numpy(array)
        if info.type == GGMLQuantizationType.F16:
            return torch.from_numpy(data.view(np.float16).reshape(info.shape).copy()).float()
        if info.type == GGMLQuantizationType.BF16:
            bits = torch.from_numpy(data.view(np.int16).reshape(info.shape).copy())
            return bits.view(torch.bfloat16).float()
        try:
            return dequantize_raw(data, info.type, info.shape)
        except NotImplementedError:  # a real GGML type (I32, Q8_K, ...) that no dequantizer here reads
            raise ModelFileError(
                self.path,
                f"tensor {info.name} has type {info.type.name}, which glmstack cannot read",
                field=info.name,
                offset=info.offset,
            ) from None

    def release(self, info: GGUFTensorInfo) -> None:
        """Drop a tensor's pages from this process once it has been copied out. The pages of a mapped file
        that were touched count in the process's RSS until it is unmapped: without this, loading a GGUF
        peaks at the model plus the whole file. (They stay in the page cache, the kernel's to reclaim.)"""
        advise = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None:  # not Linux: the pages are counted until close()
            return
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(advise, start, min(self.size, info.offset + info.n_bytes) - start)

    def close(self) -> None:
        self._map.close()


# ---- dequantization of block formats ------------------------------------------------------------------

# Elements per pass of a torch dequantizer: ~4 MB of float32 temporaries stay in cache. A 4096x4096 tensor in
# one pass is ~1.5x slower, and slower than the gguf package's numpy dequantizers (which go 16 rows at a time).
# Chunked, on 4096x4096 (a shared 2-core box, best of 25), one thread: 1.1-1.4x the speed of gguf's numpy
# (Q4_K 77 -> 59 ms, Q5_K 91 -> 81, Q6_K 75 -> 60, IQ4_NL 123 -> 87, Q8_0 46 -> 43); two threads on an idle
# moment ~2.5x (Q4_K 47 -> 18 ms, Q6_K 49 -> 17, IQ4_NL 97 -> 33) - but several times slower than numpy while
# other processes hold the cores (torch's worker threads wait on each other).
DEQUANT_CHUNK = 1 << 20


def dequantize_raw(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """A block-quantized tensor's bytes (as `GGUFFile.raw` gives them; read-only is fine) as float32 of
    `shape`, equal bit for bit to the gguf package's dequantization. Raises NotImplementedError for a type
    neither we nor the gguf package can read."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    k = shape[-1]
    rows = int(np.prod(shape[:-1]))
    if k % block or raw.size != rows * (k // block) * type_size:
        raise ValueError(f"{raw.size} bytes of {qtype.name} do not hold a {tuple(shape)} tensor")
    by_row = raw.reshape(rows, -1)
    fast = _TORCH_DEQUANT.get(qtype)
    if fast is None:
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(by_row, qtype).reshape(shape))
    out = torch.empty(rows, k)
    step = max(1, DEQUANT_CHUNK // k)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        # np.array copies: the GGUF map is read-only and torch wants writable memory
        out[start:stop] = fast(torch.from_numpy(np.array(by_row[start:stop])), (stop - start, k))
    return out.view(shape)


def _blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    return data.view(-1, type_size)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of each block, as float32 [blocks, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _bits(packed: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """packed [..., B] -> [..., len(shifts), B]: each byte shifted right by every shift, masked."""
    shift = torch.tensor(shifts, dtype=torch.uint8).view(-1, 1)
    return (packed.unsqueeze(-2) >> shift) & mask


def _dequant_q8_0(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 34)  # f16 scale + 32 int8
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    q = blocks[:, 2:].contiguous().view(torch.int8).float()
    return (q * scale).reshape(shape)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    # ggml packs element j in the low nibble of byte j and element j+16 in the high nibble
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()


def _dequant_q4_0(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 18)  # f16 scale + 16 bytes of nibbles
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    return ((_nibbles(blocks[:, 2:]) - 8.0) * scale).reshape(shape)


def _dequant_q4_1(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 20)  # f16 scale, f16 min, 16 bytes of nibbles
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    minimum = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return (_nibbles(blocks[:, 4:]) * scale + minimum).reshape(shape)


def _q5_codes(blocks: torch.Tensor, high: int) -> torch.Tensor:
    """Q5_0/Q5_1 codes 0..31: a little-endian u32 of fifth bits (bit j is element j's), then 16 bytes of
    nibbles (element j low, j + 16 high)."""
    # shifting the u32 read as int32 (sign extension only touches bits above the one masked) is ~3x faster
    # than unpacking the 4 bytes bit by bit
    fifth = blocks[:, high : high + 4].contiguous().view(torch.int32) >> torch.arange(32, dtype=torch.int32)
    nibbles = blocks[:, high + 4 :]
    return torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1) | ((fifth & 1).to(torch.uint8) << 4)


def _dequant_q5_0(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 22)  # f16 d, 4 bytes of fifth bits, 16 bytes of nibbles
    return ((_q5_codes(blocks, 2).float() - 16.0) * _f16(blocks, 0)).reshape(shape)


def _dequant_q5_1(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 24)  # f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles
    return (_q5_codes(blocks, 4).float() * _f16(blocks, 0) + _f16(blocks, 2)).reshape(shape)


def k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and mins (ggml's get_scale_min_k4) -> uint8 [.., 8]
    each: bytes 0-3 hold scales 0-3 (and the top bits of scales 4-7), bytes 4-7 mins 0-3 (and the top bits
    of mins 4-7), bytes 8-11 the low nibbles of scales 4-7 and mins 4-7."""
    sc_lo, m_lo, both = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((sc_lo & 0x3F, (both & 0x0F) | ((sc_lo >> 2) & 0x30)), dim=-1)
    m = torch.cat((m_lo & 0x3F, (both >> 4) | ((m_lo >> 2) & 0x30)), dim=-1)
    return sc, m


def q4_k_codes(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K's 128 bytes of nibbles -> uint8 codes [.., 8, 32] by sub-block: each 64-weight chunk is 32
    bytes, the low nibbles its first 32 weights and the high nibbles the next 32."""
    return _bits(qs.reshape(*qs.shape[:-1], 4, 32), (0, 4), 0x0F).flatten(-3, -2)


def _k_affine(blocks: torch.Tensor, q: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Q4_K/Q5_K: w = (d·sc)·q - dmin·m per 32-weight sub-block; q [blocks, 8, 32]."""
    sc, m = k_scale_min(blocks[:, 4:16])
    scale = (_f16(blocks, 0) * sc.float())[..., None]
    shift = (_f16(blocks, 2) * m.float())[..., None]
    return (scale * q.float() - shift).reshape(shape)


def _dequant_q4_k(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 144)  # f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles
    return _k_affine(blocks, q4_k_codes(blocks[:, 16:]), shape)


def _dequant_q5_k(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 176)  # as Q4_K, with 32 bytes of fifth bits (bit j: sub-block j) before the nibbles
    fifth = _bits(blocks[:, 16:48], tuple(range(8)), 1)
    return _k_affine(blocks, q4_k_codes(blocks[:, 48:]) | (fifth << 4), shape)


def _dequant_q6_k(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales (one per 16 weights), f16 d
    blocks = _blocks(data, 210)
    low = _bits(blocks[:, :128].reshape(-1, 2, 64), (0, 4), 0x0F).reshape(-1, 8, 32)
    high = _bits(blocks[:, 128:192].reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).view(-1, 16, 16).float()
    scale = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float())[..., None]
    return (scale * q).reshape(shape)


def _dequant_q2_k(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # 16 bytes of 4-bit scale | 4-bit min (one pair per 16 weights), 64 bytes of 2-bit codes, f16 d, f16 dmin
    blocks = _blocks(data, 84)
    scales = blocks[:, :16]
    scale = (_f16(blocks, 80) * (scales & 0x0F).float())[..., None]
    shift = (_f16(blocks, 82) * (scales >> 4).float())[..., None]
    q = _bits(blocks[:, 16:80].reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 16, 16).float()
    return (scale * q - shift).reshape(shape)


def _dequant_q3_k(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # 32 bytes of high bits (set bit: no -4 offset), 64 bytes of 2-bit codes, 12 bytes of 6-bit signed
    # scales (low nibbles in bytes 0-7, high pairs in bytes 8-11), f16 d
    blocks = _blocks(data, 110)
    lo = _bits(blocks[:, 96:104], (0, 4), 0x0F).reshape(-1, 16)
    hi = _bits(blocks[:, 104:108], (0, 2, 4, 6), 0x03).reshape(-1, 16)
    sc = ((lo | (hi << 4)).view(torch.int8) - 32).float()
    scale = (_f16(blocks, 108) * sc)[..., None]
    low = _bits(blocks[:, 32:96].reshape(-1, 2, 32), (0, 2, 4, 6), 0x03).reshape(-1, 16, 16)
    high = _bits(blocks[:, :32].reshape(-1, 1, 32), tuple(range(8)), 1).reshape(-1, 16, 16)
    q = (low.view(torch.int8) - ((high ^ 1) << 2).view(torch.int8)).float()
    return (scale * q).reshape(shape)


IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _dequant_iq4_nl(data: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    blocks = _blocks(data, 18)  # f16 d, 16 bytes of indices into IQ4_NL_VALUES (ordered as Q4_0's nibbles)
    grid = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
    codes = torch.cat((blocks[:, 2:] & 0x0F, blocks[:, 2:] >> 4), dim=-1)
    return (_f16(blocks, 0) * grid[codes.long()]).reshape(shape)


_TORCH_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q5_0: _dequant_q5_0,
    GGMLQuantizationType.Q5_1: _dequant_q5_1,
    GGMLQuantizationType.Q2_K: _dequant_q2_k,
    GGMLQuantizationType.Q3_K: _dequant_q3_k,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q5_K: _dequant_q5_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
    GGMLQuantizationType.IQ4_NL: _dequant_iq4_nl,
}
