"""Loading within budget and `glmstack quantize`: weights quantized as they are read, nothing of the file kept
mapped, and quantized checkpoints that load back exactly (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from glm_vocab import glm4_gguf_metadata
from test_glm_models import tiny_glm4
from test_llama import tiny_llama, write_gguf

import glmstack
from glmstack.cli.main import main as cli
from glmstack.engine import native
from glmstack.engine.describe import default_load
from glmstack.engine.loading.checkpoint import cpu_has_bf16, load_model, pick_dtype, stored_dtype
from glmstack.engine.quant.embedding import QuantizedEmbedding
from glmstack.engine.quant.int4 import Int4Linear
from glmstack.engine.quant.int8 import Int8Linear
from glmstack.engine.quant.quantize_model import model_bytes, quantize_model
from glmstack.engine.tokenization.gguf_vocab import tokenizer_from_gguf

PROMPT = torch.tensor([[3, 17, 5, 42, 8, 11, 60, 2]])


def logits(model: glmstack.ChatModel) -> torch.Tensor:
    with torch.no_grad():
        return model.module(PROMPT, torch.arange(PROMPT.shape[1])[None]).float()


def mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.fixture(params=["llama", "glm4"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    model = tiny_llama() if request.param == "llama" else tiny_glm4()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")  # bf16 on disk, as published checkpoints are
    tokenizer_from_gguf(glm4_gguf_metadata()).backend.save(str(tmp_path / "src" / "tokenizer.json"))
    return tmp_path / "src"


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_writes_a_checkpoint_that_loads_back_exactly(source: Path, tmp_path: Path, bits: int) -> None:
    if bits == 4 and not native.available():
        pytest.skip("int4 checkpoints are written in the native kernels' layout")
    out = tmp_path / f"int{bits}"
    assert cli(["quantize", str(source), "--bits", str(bits), "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "glmstack", "bits": bits, "group_size": 32,
                                             "version": 1}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json"]
    direct, _ = glmstack.load(source, device="cpu", quantize=f"int{bits}")
    saved, _ = glmstack.load(out, device="cpu")  # "auto" keeps what the checkpoint records
    assert saved.module.quantization == f"int{bits}" and saved.dtype == torch.bfloat16
    kinds = {type(m) for m in saved.module.modules()}
    assert (Int4Linear if bits == 4 else Int8Linear) in kinds and QuantizedEmbedding in kinds
    assert torch.equal(logits(saved), logits(direct))  # the same quantization, read back bit for bit
    for name, tensor in direct.module.state_dict().items():
        assert torch.equal(tensor, saved.module.state_dict()[name]), name
    # a quantized checkpoint runs in its own precision whatever is asked
    again, _ = glmstack.load(out, device="cpu", quantize=None)
    assert again.module.quantization == f"int{bits}"


def test_quantize_refuses_what_it_cannot_write(source: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "taken").mkdir()
    assert cli(["quantize", str(source), "--bits", "8", "-o", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    gguf_path = tmp_path / "m.gguf"
    write_gguf(tiny_llama(), gguf_path, "llama")
    assert cli(["quantize", str(gguf_path), "--bits", "4", "-o", str(tmp_path / "q")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_weights_are_quantized_as_they_are_read_and_the_file_is_not_kept_mapped(source: Path) -> None:
    loaded = load_model(source, device="cpu", quantize=4)
    # every quantized linear's float weight was never materialized: it is still on the meta device
    quantized = {f"{name}.weight" for name in loaded.prequantized}
    assert quantized and all(t.is_meta for n, t in loaded.module.state_dict(keep_vars=True).items() if n in quantized)
    assert not any(mapped(p) for p in source.glob("*.safetensors"))
    gguf_path = source.parent / "m.gguf"
    write_gguf(tiny_llama(), gguf_path, "llama")
    load_model(gguf_path, device="cpu", quantize=4)
    assert not mapped(gguf_path)


def test_a_16_bit_checkpoint_stays_16_bit_on_a_cpu_with_bf16(source: Path, tmp_path: Path) -> None:
    ckpt_dtype = stored_dtype(glmstack.engine.loading.checkpoint.open_checkpoint(source))
    assert ckpt_dtype == torch.bfloat16
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, stored=torch.float32) == torch.float32
    assert pick_dtype("float32", cpu, stored=torch.bfloat16) == torch.float32  # --dtype still decides
    with_bf16 = glmstack.engine.loading.checkpoint.cpu_has_bf16()
    assert pick_dtype("auto", cpu, stored=torch.bfloat16) == (torch.bfloat16 if with_bf16 else torch.float32)
    model, _ = glmstack.load(source, device="cpu")
    assert model.dtype == (torch.bfloat16 if with_bf16 else torch.float32)


def test_inspect_says_what_a_default_load_holds(source: Path, tmp_path: Path) -> None:
    """`glmstack inspect`'s "loads as" line: the precision and weight bytes of `glmstack.load(quantize="auto")`."""
    gguf_path = tmp_path / "q.gguf"
    write_gguf(tiny_llama(), gguf_path, "llama", quant=gguf.GGMLQuantizationType.Q4_0)
    for path, expected in ((source, "bfloat16" if cpu_has_bf16() else "float32"), (gguf_path, "int4")):
        precision, weights = default_load(path, device="cpu")
        assert precision == expected
        # as glmstack.load(quantize="auto") loads it (this GGUF has no tokenizer for the whole of load())
        bits = 4 if precision == "int4" else 0
        loaded = load_model(path, device="cpu", dtype="bfloat16" if bits else "auto", quantize=bits)
        quantize_model(loaded.module, bits, prequantized=loaded.prequantized)
        held = model_bytes(loaded.module)
        # a GGUF is counted per tensor of the file; the model holds a few small buffers beside (rotary tables)
        assert abs(weights - held) <= 0.03 * held, (path.name, weights, held)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_as_read_equals_quantizing_after_loading(source: Path, bits: int) -> None:
    """Per tensor, per piece, packed a slice at a time: the same module tensors as the whole float model
    quantized afterwards."""
    after = load_model(source, device="cpu", dtype="bfloat16").module
    quantize_model(after, bits)
    loaded = load_model(source, device="cpu", dtype="bfloat16", quantize=bits)
    quantize_model(loaded.module, bits, prequantized=loaded.prequantized)
    expected = after.state_dict()
    got = loaded.module.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
