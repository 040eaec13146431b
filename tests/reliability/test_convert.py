"""Legacy `.bin` checkpoints: ChatGLM-6B's sharded layout loads through the weights-only unpickler, and
`convert_checkpoint` rewrites it as safetensors that load to identical logits, leaving pickles behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from hostile_files import MARKER, reduce_pickle, torch_zip

from glmstack.cli.main import build_parser
from glmstack.engine.errors import ModelFileError
from glmstack.engine.loading import checkpoint as loading
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.loading.convert import convert_checkpoint

pytestmark = pytest.mark.reliability


def tiny_llama(tied: bool) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def write_bin_checkpoint(folder: Path, model: transformers.PreTrainedModel, shards: int) -> Path:
    """ChatGLM-6B's layout: pytorch_model-0000N-of-0000M.bin and pytorch_model.bin.index.json, or one
    pytorch_model.bin."""
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        names, weight_map = list(state), {}
        for number in range(shards):
            shard = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
            part = names[number::shards]
            torch.save({name: state[name] for name in part}, folder / shard)
            weight_map.update(dict.fromkeys(part, shard))
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "training_args.bin").write_bytes(b"a pickle that must not be copied")
    return folder


def logits(path: Path) -> torch.Tensor:
    loaded = load_model(path, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 5, 9, 33, 2, 60]])
    with torch.no_grad():
        return loaded.module(ids, torch.arange(ids.shape[1])[None])


@pytest.mark.parametrize("shards,tied", [(3, False), (1, True)])
def test_bin_checkpoint_converts_to_identical_safetensors(tmp_path: Path, shards: int, tied: bool) -> None:
    model = tiny_llama(tied)
    src = write_bin_checkpoint(tmp_path / "bin", model, shards)
    with torch.no_grad():
        expected = model(torch.tensor([[1, 5, 9, 33, 2, 60]])).logits
    before = logits(src)
    assert (before - expected).abs().max().item() <= 1e-4  # the .bin layout loads, and correctly

    dst = convert_checkpoint(src, tmp_path / "st")
    files = sorted(p.name for p in dst.iterdir())
    weights = [name for name in files if name.endswith(".safetensors")]
    assert len(weights) == shards and ("model.safetensors.index.json" in files) == (shards > 1)
    assert "config.json" in files and "tokenizer_config.json" in files
    assert not [name for name in files if name.endswith(".bin") or "pytorch_model" in name]
    assert torch.equal(logits(dst), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "st"]  # no partial folder left


def test_convert_never_overwrites(tmp_path: Path) -> None:
    src = write_bin_checkpoint(tmp_path / "bin", tiny_llama(False), 1)
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        convert_checkpoint(src, tmp_path / "st")
    assert [p.name for p in (tmp_path / "st").iterdir()] == ["keep.txt"]


def test_convert_refuses_safetensors_and_payloads(tmp_path: Path) -> None:
    folder = tmp_path / "st"
    tiny_llama(False).save_pretrained(folder)
    with pytest.raises(ModelFileError, match="already a safetensors checkpoint"):
        convert_checkpoint(folder, tmp_path / "out")
    src = write_bin_checkpoint(tmp_path / "bad", tiny_llama(False), 1)
    (src / "pytorch_model.bin").write_bytes(torch_zip(reduce_pickle("os", "system", f"touch {src / MARKER}")))
    with pytest.raises(ModelFileError, match="weights-only unpickler refused GLOBAL os.system"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (src / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "st"]


def test_pickles_need_a_torch_with_a_safe_weights_only_loader(tmp_path: Path, monkeypatch) -> None:
    assert loading.torch_load_is_safe()  # the installed torch is at or above the floor
    src = write_bin_checkpoint(tmp_path / "bin", tiny_llama(False), 1)
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    assert not loading.torch_load_is_safe()
    with pytest.raises(ModelFileError, match=r"torch 2\.5\.1.*only safe from torch 2\.6 \(CVE-2025-32434\)"):
        load_model(src, device="cpu")


def test_cli_convert(tmp_path: Path) -> None:
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    if "convert" not in commands:
        pytest.skip("`glmstack convert` is not wired into the CLI yet")
    src = write_bin_checkpoint(tmp_path / "bin", tiny_llama(False), 1)
    run = [sys.executable, "-m", "glmstack.cli.main", "convert", str(src), str(tmp_path / "st")]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "st" / "model.safetensors").is_file()
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
