"""Hostile GGUF files, built byte by byte with struct so every count, length, offset and dimension is ours.

`GGUF_FILES` maps a description to a file's bytes: the header (magic, version, counts), metadata strings,
values and arrays, alignment, tensor infos (n_dims, dims, types, offsets), tensor data, and metadata that
declares absurd or inconsistent model sizes. Layout: magic "GGUF", u32 version, u64 tensor_count, u64
kv_count, the key/value pairs, the tensor infos, padding to the alignment (32), the tensor data.
"""

from __future__ import annotations

import struct

U8, U32, I32, F32, STRING, ARRAY, U64 = 0, 4, 5, 6, 8, 9, 10  # GGUF value types
GGML_F32, GGML_Q8_0, GGML_Q8_1 = 0, 8, 9  # tensor types


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string: u64 length, then the bytes (the length may lie)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def u64(key: str, value: int) -> bytes:
    return kv(key, U64, struct.pack("<Q", value))


def string(key: str, value: str) -> bytes:
    return kv(key, STRING, gstr(value))


def array(key: str, item_type: int, count: int, items: bytes = b"") -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", item_type, count) + items)


def tensor_info(name: str, dims: list[int], ggml_type: int = GGML_F32, offset: int = 0) -> bytes:
    """dims in GGUF order (innermost first)."""
    packed = b"".join(struct.pack("<Q", d) for d in dims)
    return gstr(name) + struct.pack("<I", len(dims)) + packed + struct.pack("<IQ", ggml_type, offset)


def gguf(
    kvs: list[bytes],
    infos: list[bytes] = (),
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> bytes:
    head = b"GGUF" + struct.pack("<I", version)
    head += struct.pack(
        "<QQ", len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


ARCH = string("general.architecture", "llama")
# A structurally valid tiny Llama: vocab 16, hidden 8, one layer (of which only the norm is present).
LLAMA_META = {
    "general.architecture": ARCH,
    "llama.block_count": u32("llama.block_count", 1),
    "llama.embedding_length": u32("llama.embedding_length", 8),
    "llama.feed_forward_length": u32("llama.feed_forward_length", 16),
    "llama.attention.head_count": u32("llama.attention.head_count", 2),
    "llama.context_length": u32("llama.context_length", 32),
}
LLAMA_TENSORS = {"token_embd.weight": [8, 16], "output_norm.weight": [8], "blk.0.attn_norm.weight": [8]}


def llama(*replaced: bytes, types: dict[str, tuple[int, list[int], int]] | None = None) -> bytes:
    """The tiny Llama with metadata entries added or replaced (matched by key), and tensors given other
    (type, dims, bytes)."""
    meta = dict(LLAMA_META)
    for entry in replaced:
        (key_len,) = struct.unpack_from("<Q", entry)
        meta[entry[8 : 8 + key_len].decode()] = entry
    infos, offset = [], 0
    for name, dims in LLAMA_TENSORS.items():
        ggml_type, dims, size = (types or {}).get(name, (GGML_F32, dims, 4 * dims[0] * (dims[1:] or [1])[0]))
        infos.append(tensor_info(name, dims, ggml_type, offset))
        offset += size + -size % 32
    return gguf(list(meta.values()), infos, b"\0" * offset)


def one_tensor(info: bytes, data: bytes = b"\0" * 64) -> bytes:
    return gguf([ARCH], [info], data)


def two_tensors(a: bytes, b: bytes, data_bytes: int) -> bytes:
    return gguf([ARCH], [a, b], b"\0" * data_bytes)


_INFOS_START = len(gguf(list(LLAMA_META.values()))) - 32  # at most: where the padding may begin
_LLAMA = llama()

GGUF_FILES: dict[str, tuple[bytes, str]] = {  # description -> (the file, what the refusal must say)
    # header
    "empty file": (b"", "too short for a GGUF header"),
    "magic only": (b"GGUF", "too short"),
    "magic and version only": (b"GGUF" + struct.pack("<I", 3), "too short"),
    "bad magic": (b"GGML" + gguf([])[4:], "bad magic"),
    "version 1": (gguf([], version=1), "unsupported GGUF version 1"),
    "version 2**32-1": (gguf([], version=2**32 - 1), "unsupported GGUF version"),
    "tensor_count 2**63": (gguf([], n_tensors=2**63), "tensor_count 9223372036854775808 exceeds"),
    "kv_count 2**63": (gguf([], n_kv=2**63), "kv_count 9223372036854775808 exceeds"),
    "kv_count 2**64-1": (gguf([], n_kv=2**64 - 1), "kv_count 18446744073709551615 exceeds"),
    "kv_count larger than the bytes left": (gguf([u32("a", 1)], n_kv=5000), "(field kv_count)"),
    "tensor_count larger than the bytes left": (gguf([u32("a", 1)], n_tensors=5000), "(field tensor_count)"),
    # metadata strings, values and arrays
    "key length 2**63": (gguf([gstr("k", 2**63) + struct.pack("<I", U32) + b"\0" * 4]), "string length"),
    "key length past EOF": (gguf([gstr("key", 4096)]), "needs 4096 bytes"),
    "string value length 2**63": (
        gguf([kv("n", STRING, gstr("x", 2**63))]),
        "string length 9223372036854775808",
    ),
    "string value length past EOF": (gguf([kv("n", STRING, gstr("x" * 10, 10_000))]), "needs 10000 bytes"),
    "unknown value type": (gguf([kv("general.name", 13, b"\0" * 8)]), "unknown value type 13"),
    # the file from the issue: 24-byte header, key "a", type array, item type u8, count 2**63 -- 49 bytes
    "the 49-byte file with an array of 2**63 u8": (
        gguf([], n_kv=1)[:24] + array("a", U8, 2**63),
        "array of 9223372036854775808 items",
    ),
    "array of 2**63 strings": (gguf([array("tokens", STRING, 2**63)]), "array of 9223372036854775808 items"),
    "array of u32 longer than the file": (gguf([array("a", U32, 1000, b"\0" * 8)]), "does not fit"),
    "arrays nested 100000 deep": (
        gguf(
            [array("a", ARRAY, 1, struct.pack("<IQ", ARRAY, 1) * 100_000 + struct.pack("<IQ", U8, 1) + b"\0")]
        ),
        "arrays nested deeper",
    ),
    "array of an unknown item type": (gguf([array("a", 77, 4, b"\0" * 64)]), "unknown value type 77"),
    "duplicate metadata key": (gguf([u32("a", 1), u32("a", 2)]), "duplicate metadata key"),
    # alignment
    "alignment 0": (llama(u32("general.alignment", 0)), "general.alignment 0 is not a power of two"),
    "alignment 3": (llama(u32("general.alignment", 3)), "general.alignment 3 is not"),
    "alignment 2**31": (llama(u32("general.alignment", 2**31)), "general.alignment 2147483648 is not"),
    "alignment is a string": (llama(string("general.alignment", "32")), "general.alignment '32' is not"),
    # tensor infos
    "n_dims 10**6": (
        one_tensor(gstr("t") + struct.pack("<I", 10**6) + struct.pack("<Q", 1) * 4 + b"\0" * 12),
        "n_dims=1000000",
    ),
    "n_dims 0": (one_tensor(gstr("t") + struct.pack("<IIQ", 0, GGML_F32, 0)), "n_dims=0"),
    "a zero dimension": (one_tensor(tensor_info("t", [4, 0])), "has dimension 0"),
    "dimensions whose product wraps 64 bits": (one_tensor(tensor_info("t", [2**32] * 3)), "beyond the cap"),
    "2**63 elements": (one_tensor(tensor_info("t", [2**31, 2**32])), "beyond the cap"),
    "unknown tensor type": (one_tensor(tensor_info("t", [4], ggml_type=999)), "unknown type 999"),
    "removed tensor type 4 (Q4_2)": (one_tensor(tensor_info("t", [32], ggml_type=4)), "unknown type 4"),
    "row not a multiple of the Q8_0 block": (
        one_tensor(tensor_info("t", [33], ggml_type=GGML_Q8_0)),
        "not a multiple of the Q8_0 block size",
    ),
    "tensor name length 2**63": (
        one_tensor(gstr("t", 2**63) + struct.pack("<IQIQ", 1, 4, GGML_F32, 0)),
        "(field tensor[0].name)",
    ),
    # tensor data
    "tensor offset past EOF": (one_tensor(tensor_info("t", [4], offset=2**40)), "past the end of the file"),
    "tensor offset 2**64-32 (wraps)": (one_tensor(tensor_info("t", [16], offset=2**64 - 32)), "past the end"),
    "tensor data runs past EOF": (one_tensor(tensor_info("t", [64])), "ends at byte 384, past the end"),
    "misaligned tensor offset": (
        one_tensor(tensor_info("t", [4], offset=4)),
        "offset 4 is not aligned to 32",
    ),
    "two tensors at one offset": (
        two_tensors(tensor_info("a", [8]), tensor_info("b", [8]), 64),
        "tensors a and b overlap",
    ),
    "partially overlapping tensors": (
        two_tensors(tensor_info("a", [16]), tensor_info("b", [16], offset=32), 128),
        "tensors a and b overlap",
    ),
    "duplicate tensor name": (
        two_tensors(tensor_info("a", [8]), tensor_info("a", [8], offset=32), 64),
        "duplicate tensor 'a'",
    ),
    "a tensor type no dequantizer reads (Q8_1)": (
        llama(types={"blk.0.attn_norm.weight": (GGML_Q8_1, [32], 36)}),
        "has type Q8_1, which glmstack cannot read",
    ),
    "truncated in the metadata": (_LLAMA[: _INFOS_START - 20], "(field metadata key)"),
    "truncated in the tensor infos": (_LLAMA[: _INFOS_START + 42], "(field token_embd.weight.dims)"),
    "truncated in the tensor data": (_LLAMA[:-8], "file is truncated"),
    # metadata declaring sizes the tensors do not have
    "block_count 9999": (llama(u32("llama.block_count", 9999)), "llama.block_count = 9999 is not an integer"),
    "block_count 8 with tensors for one layer": (
        llama(u32("llama.block_count", 8)),
        "llama.block_count = 8, but the file holds tensors for only 1",
    ),
    "block_count -1 (i32)": (
        llama(kv("llama.block_count", I32, struct.pack("<i", -1))),
        "block_count = -1 is",
    ),
    "block_count is a string": (llama(string("llama.block_count", "1")), "block_count = '1' is not"),
    "block_count is a float": (llama(kv("llama.block_count", F32, struct.pack("<f", 1.0))), "= 1.0 is not"),
    "embedding_length 10**9": (llama(u32("llama.embedding_length", 10**9)), "embedding_length = 1000000000"),
    "embedding_length disagrees with token_embd": (
        llama(u32("llama.embedding_length", 16)),
        "does not match the embedding's width 8",
    ),
    "vocab_size 10**12": (llama(u64("llama.vocab_size", 10**12)), "llama.vocab_size = 1000000000000 is not"),
    "feed_forward_length larger than any tensor": (
        llama(u32("llama.feed_forward_length", 65536)),
        "no tensor in the file has a dimension that large",
    ),
    "head_count 0": (llama(u32("llama.attention.head_count", 0)), "head_count = 0 is not"),
    "context_length 2**62": (
        llama(u64("llama.context_length", 2**62)),
        "context_length = 4611686018427387904",
    ),
}
assert len(GGUF_FILES["the 49-byte file with an array of 2**63 u8"][0]) == 49
