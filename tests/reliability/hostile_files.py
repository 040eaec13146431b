"""Hostile model files: GGUF (see hostile_gguf.py), safetensors headers, config.json, shard indexes, pickles.

Each `HostileCase` writes its file(s) into an empty folder and returns the path to load; every one must be
refused with `ModelFileError` (test_hostile_files.py). Cases whose payload would run code make it create
`folder / MARKER`; the tests check it never appears.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hostile_gguf import GGUF_FILES

MARKER = "PWNED"


@dataclass(frozen=True)
class HostileCase:
    name: str
    build: Callable[[Path], Path]  # folder -> the path to load
    expect: str  # part of the refusal's message, so a case refused for the wrong reason fails
    payload: bool = False  # the file would create folder/MARKER if anything executed it

    def __str__(self) -> str:
        return self.name


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- safetensors and config.json ---------------------------------------------------------------------------

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}
LLAMA_STATE = {  # name -> (shape, data_offsets) in F32
    "model.embed_tokens.weight": ([16, 8], [0, 512]),
    "model.layers.0.input_layernorm.weight": ([8], [512, 544]),
    "model.norm.weight": ([8], [544, 576]),
}
DATA = b"\0" * 576


def config(folder: Path, **overrides: object) -> None:
    (folder / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **overrides}))


def safetensors(header: object, data: bytes = DATA, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def header(**norm: object) -> dict:
    """A valid header for LLAMA_STATE, with model.norm.weight's entry changed by `norm` (or replaced by
    norm["entry"])."""
    entries = {name: {"dtype": "F32", "shape": s, "data_offsets": o} for name, (s, o) in LLAMA_STATE.items()}
    entries["model.norm.weight"] = norm.get("entry", {**entries["model.norm.weight"], **norm})
    return entries


SAFETENSORS_FILES: dict[str, tuple[bytes, str]] = {  # description -> (model.safetensors, expected message)
    "empty file": (b"", "too short for a safetensors header"),
    "7 bytes": (b"\x10" + b"\0" * 6, "too short"),
    "header length larger than the file": (safetensors(header(), header_len=10**6), "header length 1000000"),
    "header length 2**63": (safetensors(header(), header_len=2**63), "header length 9223372036854775808"),
    "header length 0": (safetensors(b"", b"{}"), "header length 0 is zero"),
    "header is not JSON": (safetensors(b"{not json", b"\0" * 8), "header is not valid JSON"),
    "header is not UTF-8": (safetensors(b'{"\xff\xfe": 1}'), "can't decode byte 0xff"),
    "header is a JSON array": (safetensors([1, 2, 3]), "header is not a JSON object"),
    "header nested 100000 deep": (safetensors(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "duplicate tensor key": (
        safetensors(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            b"\0" * 8,
        ),
        "duplicate key 'a'",
    ),  # fmt: skip
    "tensor entry is not an object": (safetensors(header(entry=[1, 2])), "entry [1, 2] is not an object"),
    "unknown dtype": (safetensors(header(dtype="F128")), "unknown dtype 'F128'"),
    "negative offset": (safetensors(header(data_offsets=[-32, 0])), "invalid data_offsets [-32, 0]"),
    "float offsets": (safetensors(header(data_offsets=[544.0, 576.0])), "invalid data_offsets [544.0"),
    "offsets reversed": (safetensors(header(data_offsets=[576, 544])), "data 576..544 lies outside"),
    "offsets past EOF": (safetensors(header(data_offsets=[2**40, 2**40 + 32])), "lies outside the file's"),
    "shape does not match the bytes": (safetensors(header(shape=[9])), "32 bytes do not match shape [9]"),
    "negative dimension": (safetensors(header(shape=[-8, -1])), "invalid shape [-8, -1]"),
    "shape product overflows 64 bits": (safetensors(header(shape=[2**32] * 3)), "elements (field model.norm"),
    "overlapping tensors": (safetensors(header(data_offsets=[512, 544])), "overlaps the tensor before it"),
    "a gap between tensors": (
        safetensors(header(data_offsets=[576, 608]), DATA + b"\0" * 32),
        "bytes 544..576 of the data belong to no",
    ),
    "bytes after the last tensor": (
        safetensors(header(), DATA + b"\0" * 100),
        "100 bytes after the last tensor",
    ),
    "__metadata__ is not a map of strings": (
        safetensors({"__metadata__": {"format": ["pt"]}, **header()}),
        "__metadata__ is not a map of strings",
    ),
}

CONFIGS: dict[str, tuple[dict | bytes, str]] = {  # beside a valid model.safetensors
    "hidden_size 10**9": ({"hidden_size": 10**9}, "hidden_size = 1000000000 is not an integer"),
    "vocab_size 10**12": ({"vocab_size": 10**12}, "vocab_size = 1000000000000 is not"),
    "num_hidden_layers 10**6": ({"num_hidden_layers": 10**6}, "num_hidden_layers = 1000000 is not"),
    "more layers than the file holds": ({"num_hidden_layers": 12}, "holds tensors for only 1 layers"),
    "hidden_size disagrees with the embedding": (
        {"hidden_size": 4},
        "does not match the embedding's width 8",
    ),
    "intermediate_size larger than any tensor": ({"intermediate_size": 4096}, "no tensor in the file has"),
    "num_attention_heads 0": ({"num_attention_heads": 0}, "num_attention_heads = 0 is not"),
    "hidden_size is a string": ({"hidden_size": "8"}, "hidden_size = '8' is not"),
    "hidden_size is a float": ({"hidden_size": 8.5}, "hidden_size = 8.5 is not"),
    "hidden_size is true": ({"hidden_size": True}, "hidden_size = True is not"),
    "max_position_embeddings 2**62": (
        {"max_position_embeddings": 2**62},
        "max_position_embeddings = 4611686",
    ),
    "not JSON": (b'{"architectures": ["LlamaForCausalLM"],', "config.json: file is not valid JSON"),
    "a JSON array": (b"[]", "config.json: expected a JSON object"),
    "nested 100000 deep": (
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "config.json: file is not valid",
    ),
}


def safetensors_folder(data: bytes, config_json: dict | bytes | None = None) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        if isinstance(config_json, bytes):
            write(folder / "config.json", config_json)
        else:
            config(folder, **(config_json or {}))
        write(folder / "model.safetensors", data)
        return folder

    return build


# ---- sharded indexes ---------------------------------------------------------------------------------------

SHARD = "model-00001-of-00001.safetensors"


def sharded(folder: Path, weight_map: object, index: str = "model.safetensors.index.json") -> Path:
    config(folder)
    if index == "model.safetensors.index.json":
        write(folder / SHARD, safetensors(header()))
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def all_in(shard: object) -> dict[str, object]:
    return dict.fromkeys(LLAMA_STATE, shard)


def outside_folder(folder: Path) -> Path:
    (folder / "inner").mkdir()
    write(folder / SHARD, safetensors(header()))
    return sharded(folder / "inner", all_in(f"../{SHARD}"))


def device_shard(folder: Path) -> Path:
    os.symlink("/dev/zero", folder / "zero.safetensors")
    return sharded(folder, all_in("zero.safetensors"))


def folder_shard(folder: Path) -> Path:
    (folder / "sub").mkdir()
    return sharded(folder, all_in("sub"))


def tensor_in_two_shards(folder: Path) -> Path:
    write(folder / "copy.safetensors", safetensors(header()))
    return sharded(folder, {**all_in(SHARD), "model.norm.weight": "copy.safetensors"})


INDEXES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "shard outside the folder (../)": (outside_folder, "points outside the checkpoint folder"),
    "absolute shard path": (lambda f: sharded(f, all_in("/etc/passwd")), "'/etc/passwd' points outside"),
    "missing shard": (lambda f: sharded(f, all_in("model-00002-of-00002.safetensors")), "is missing"),
    "shard is a device": (
        device_shard,
        "zero.safetensors listed in the index is missing or not a regular file",
    ),
    "shard is a folder": (folder_shard, "sub listed in the index is missing or not a regular file"),
    "empty weight_map": (lambda f: sharded(f, {}), "index has no weight_map"),
    "weight_map value is a number": (lambda f: sharded(f, all_in(7)), "is 7, not a file name"),
    "names a tensor its shard lacks": (
        lambda f: sharded(f, {**all_in(SHARD), "lm_head.weight": SHARD}),
        "but that shard does not hold it",
    ),
    "one tensor in two shards": (tensor_in_two_shards, "is also in another shard"),
    ".bin index points outside the folder": (
        lambda f: sharded(f, all_in("../../../etc/passwd"), "pytorch_model.bin.index.json"),
        "points outside",
    ),
}


# ---- pickles -----------------------------------------------------------------------------------------------


def reduce_pickle(module: str, name: str, arg: str, protocol_0: bool = False) -> bytes:
    """A pickle that calls module.name(arg) when loaded, written opcode by opcode."""
    if protocol_0:  # MARK, the argument, INST module name: module.name(*args)
        return b"(V" + arg.encode() + b"\ni" + f"{module}\n{name}\n".encode() + b"."
    call = b"X" + struct.pack("<I", len(arg)) + arg.encode() + b"\x85R."  # the argument, TUPLE1, REDUCE
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + call


def stack_global_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol 4 STACK_GLOBAL: the callable's names come off the stack instead of the opcode."""

    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    return b"\x80\x04" + short(module) + short(name) + b"\x93" + short(arg) + b"\x85R."


def saved(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_module=pickle)
    return buffer.getvalue()


def torch_zip(data_pkl: bytes) -> bytes:
    """torch.save's zip layout (what ChatGLM-6B's .bin files are) with data.pkl replaced."""
    source = zipfile.ZipFile(io.BytesIO(saved({"model.norm.weight": torch.zeros(8)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for item in source.infolist():
            target.writestr(item, data_pkl if item.filename.endswith("/data.pkl") else source.read(item))
    return out.getvalue()


def huge_size_pickle() -> bytes:
    """A real data.pkl whose tensor claims 2**40 elements of its 32-byte storage."""
    source = zipfile.ZipFile(io.BytesIO(saved({"model.norm.weight": torch.zeros(8)})))
    pkl = next(source.read(i) for i in source.infolist() if i.filename.endswith("/data.pkl"))
    assert pkl.count(b"K\x08\x85") == 1  # the size (8,): BININT1 8, TUPLE1
    return pkl.replace(b"K\x08\x85", b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"\x85")  # LONG1 2**40


class _Payload:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.folder / MARKER}",))


def touch(folder: Path) -> str:
    return f"touch {folder / MARKER}"


REFUSED = "the weights-only unpickler refused"
PICKLES: dict[str, tuple[Callable[[Path], bytes], str]] = {  # folder -> pytorch_model.bin; * marks a payload
    "*legacy pickle calling os.system": (
        lambda f: reduce_pickle("os", "system", touch(f)),
        f"{REFUSED} GLOBAL os",
    ),
    "*torch zip calling posix.system": (
        lambda f: torch_zip(reduce_pickle("posix", "system", touch(f))),
        f"{REFUSED} GLOBAL posix.system",
    ),
    "*torch zip calling builtins.exec": (
        lambda f: torch_zip(reduce_pickle("builtins", "exec", f"open({str(f / MARKER)!r}, 'w').close()")),
        f"{REFUSED} GLOBAL exec",
    ),
    "*torch zip calling builtins.eval": (
        lambda f: torch_zip(reduce_pickle("builtins", "eval", f"__import__('os').system({touch(f)!r})")),
        f"{REFUSED} GLOBAL eval",
    ),
    "*torch zip calling subprocess.getoutput": (
        lambda f: torch_zip(reduce_pickle("subprocess", "getoutput", touch(f))),
        f"{REFUSED} GLOBAL subprocess",
    ),
    "*torch zip with protocol-0 INST": (
        lambda f: torch_zip(reduce_pickle("os", "system", touch(f), protocol_0=True)),
        REFUSED,
    ),
    "*torch zip with STACK_GLOBAL": (
        lambda f: torch_zip(stack_global_pickle("os", "system", touch(f))),
        REFUSED,
    ),
    "*payload inside a real state dict": (
        lambda f: saved({"model.norm.weight": torch.zeros(8), "x": _Payload(f)}),
        f"{REFUSED} GLOBAL posix",
    ),
    "tensor claiming 2**40 elements of a 32-byte storage": (
        lambda f: torch_zip(huge_size_pickle()),
        "cannot load as a weights-only checkpoint",
    ),
    "not a dict of tensors": (lambda f: saved([torch.zeros(8)]), "checkpoint is not a dict of tensors"),
    "truncated torch zip": (
        lambda f: saved({"model.norm.weight": torch.zeros(1024)})[:2000],
        "failed reading zip archive",
    ),
    "random bytes": (lambda f: bytes(range(256)) * 16, "cannot load as a weights-only checkpoint"),
}


def pickle_folder(make: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        config(folder)
        write(folder / "pytorch_model.bin", make(folder))
        return folder

    return build


def chatglm6b_layout_with_payload_shard(folder: Path) -> Path:
    """pytorch_model-0000N-of-00002.bin with its index, the second shard a payload."""
    config(folder)
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    weight_map = {"model.embed_tokens.weight": first, "model.norm.weight": second}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write(folder / first, saved({"model.embed_tokens.weight": torch.zeros(16, 8)}))
    write(folder / second, torch_zip(reduce_pickle("os", "system", touch(folder))))
    return folder


def remote_code_beside_a_payload(folder: Path) -> Path:
    """transformers would import modeling_evil.py for this config (trust_remote_code); glmstack never does."""
    pickle_folder(PICKLES["*torch zip calling posix.system"][0])(folder)
    config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "modeling_evil.py").write_text(f"import os\nos.system({touch(folder)!r})\n")
    return folder


# ---- all of them -------------------------------------------------------------------------------------------


def _gguf(data: bytes) -> Callable[[Path], Path]:
    return lambda folder: write(folder / "model.gguf", data)


CASES: list[HostileCase] = [
    *(HostileCase(f"gguf: {name}", _gguf(data), expect) for name, (data, expect) in GGUF_FILES.items()),
    *(
        HostileCase(f"safetensors: {name}", safetensors_folder(data), expect)
        for name, (data, expect) in SAFETENSORS_FILES.items()
    ),
    *(
        HostileCase(f"config: {name}", safetensors_folder(safetensors(header()), config_json), expect)
        for name, (config_json, expect) in CONFIGS.items()
    ),
    *(HostileCase(f"index: {name}", build, expect) for name, (build, expect) in INDEXES.items()),
    *(
        HostileCase(f"pickle: {name.lstrip('*')}", pickle_folder(make), expect, name.startswith("*"))
        for name, (make, expect) in PICKLES.items()
    ),
    HostileCase(
        "pickle: ChatGLM-6B's sharded layout with a payload shard",
        chatglm6b_layout_with_payload_shard,
        f"pytorch_model-00002-of-00002.bin: cannot load as a weights-only checkpoint ({REFUSED} GLOBAL os",
        payload=True,
    ),
    HostileCase(
        "remote code: auto_map module beside a payload checkpoint",
        remote_code_beside_a_payload,
        f"pytorch_model.bin: cannot load as a weights-only checkpoint ({REFUSED} GLOBAL posix",
        payload=True,
    ),
]
