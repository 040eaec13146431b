"""Bad model files and names get one clear error naming the file and the problem; nothing executes."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from glmstack.engine.errors import (
    ContextLengthError,
    ModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from glmstack.engine.loading.catalog import resolve_model_path
from glmstack.engine.loading.checkpoint import load_model
from glmstack.settings import Settings


def tiny_checkpoint(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glmstack.cli.main", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_model_names_every_place_searched(tmp_path: Path) -> None:
    settings = Settings.from_env({"GLMSTACK_HOME": str(tmp_path / "home")})
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("no-such-model", settings)
    message = str(err.value)
    assert "'no-such-model' not found" in message
    assert "no-such-model" in message and str(tmp_path / "home" / "models" / "no-such-model") in message
    assert "bundled" in message and "\n" not in message


def test_env_var_model_is_used_and_explicit_wins(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path / "tiny")
    settings = Settings.from_env({"GLMSTACK_HOME": str(tmp_path / "home"), "GLMSTACK_MODEL": str(tmp_path / "tiny")})
    assert resolve_model_path(None, settings) == tmp_path / "tiny"
    assert resolve_model_path("smollm2", settings).suffix == ".gguf"


def test_cli_missing_model_is_one_line_exit_2(tmp_path: Path) -> None:
    result = cli("chat", "--model", str(tmp_path / "nothing-here"), "-p", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("glmstack: error: model") and "searched" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    folder = tiny_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["FancyNetForCausalLM"], "fancynet"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as err:
        load_model(folder, device="cpu")
    assert "FancyNetForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = tiny_checkpoint(tmp_path / "m")
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"missing 1 tensors.*model\.layers\.0\.mlp\.down_proj\.weight"):
        load_model(folder, device="cpu")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    folder = tiny_checkpoint(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 50
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFileError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\), the config implies \(\d+, \d+\)"
    ):
        load_model(folder, device="cpu")


@pytest.mark.parametrize(
    "damage,message",
    [
        ("truncate", "outside the file"),
        ("header_too_long", "header length"),
        ("bad_json", "not valid JSON"),
        ("overlap", "overlap"),
        ("tiny", "too short"),
    ],
)
def test_corrupt_safetensors(tmp_path: Path, damage: str, message: str) -> None:
    folder = tiny_checkpoint(tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "header_too_long":
        data = struct.pack("<Q", len(data) * 2) + data[8:]
    elif damage == "bad_json":
        data = data[:8] + b"{" + b" " * (header_len - 1) + data[8 + header_len :]
    elif damage == "overlap":
        names = [n for n in header if n != "__metadata__"]
        a, b = header[names[0]], header[names[1]]
        size_b = b["data_offsets"][1] - b["data_offsets"][0]
        if a["data_offsets"][1] - a["data_offsets"][0] == size_b:
            b["data_offsets"] = list(a["data_offsets"])
        else:  # shift b's start into a; keep its length
            b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
        assert len(raw) == header_len
        data = data[:8] + raw + data[8 + header_len :]
    elif damage == "tiny":
        data = data[:5]
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as err:
        load_model(folder, device="cpu")
    assert str(path) in str(err.value) and message in str(err.value)


def write_tiny_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", torch.zeros(64, 32).numpy())
    writer.add_tensor("output_norm.weight", torch.ones(32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    "damage,message",
    [
        ("empty", "too short"),
        ("magic", "bad magic"),
        ("truncate", "truncated"),
        ("huge_count", "exceeds the cap"),
        ("version", "unsupported GGUF version"),
    ],
)
def test_corrupt_gguf(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path)
    data = path.read_bytes()
    if damage == "empty":
        data = b""
    elif damage == "magic":
        data = b"GGUX" + data[4:]
    elif damage == "truncate":
        data = data[: len(data) - 64]
    elif damage == "huge_count":
        data = data[:8] + struct.pack("<Q", 2**63) + data[16:]
    elif damage == "version":
        data = data[:4] + struct.pack("<I", 99) + data[8:]
    path.write_bytes(data)
    with pytest.raises(ModelFileError) as err:
        load_model(path, device="cpu")
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_gguf_tensors_are_named(tmp_path: Path) -> None:
    path = tmp_path / "partial.gguf"
    write_tiny_gguf(path)  # a llama GGUF with no layer tensors at all
    with pytest.raises(ModelFileError, match=r"missing \d+ tensors.*model\.layers\.0\."):
        load_model(path, device="cpu")


def test_cli_corrupt_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    result = cli("chat", "--model", str(path), "-p", "hi")
    assert result.returncode == 2
    assert str(path) in result.stderr and "Traceback" not in result.stderr and result.stderr.count("\n") == 1


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_never_runs(tmp_path: Path) -> None:
    folder = tiny_checkpoint(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Boom(str(marker))}, f)
    with pytest.raises(ModelFileError, match="weights-only"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def test_context_policy_drops_oldest_turns_then_errors(bundled) -> None:
    model, tokenizer = bundled
    small = copy.copy(model)
    small.config = dataclasses.replace(model.config, max_position_embeddings=160)  # reserve = 40 tokens
    turn = "Tell me about the history of the city of Lyon in France, please. " * 2
    history = [(turn, "Lyon is old. " * 6) for _ in range(6)]
    prompt_ids, kept = small.render_chat(
        [m for q, r in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]
        + [{"role": "user", "content": "And Paris?"}],
        reserve=40,
    )
    assert len(prompt_ids) <= 120
    assert kept[-1]["content"] == "And Paris?" and 0 < len(kept) < 13 and kept[0]["role"] == "user"
    response, new_history = small.chat(tokenizer, "And Paris?", history, do_sample=False, max_new_tokens=8)
    assert len(new_history) == 7  # the caller's history is returned whole; only the prompt was trimmed
    with pytest.raises(ContextLengthError, match="does not fit"):
        small.chat(tokenizer, "word " * 400, [], max_new_tokens=8)


def test_a_missing_or_garbled_tokenizer_json_names_the_file(tmp_path: Path) -> None:
    from glmstack.engine.tokenization.hf import load_tokenizer_json

    with pytest.raises(ModelFileError, match=r"tokenizer\.json.*no tokenizer here"):
        load_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{garbled")
    with pytest.raises(ModelFileError, match=r"tokenizer\.json.*cannot read the tokenizer"):
        load_tokenizer_json(tmp_path)
