"""`describe()`'s int8/int4 memory against real quantized loads: equal to the byte, because both are
`quantize_model` — describe runs it on the meta device (see engine/describe.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import torch
from test_chatglm_v1 import v1_weights, write_checkpoint
from test_glm_models import H, thudm_weights, tiny_glm4, write_thudm
from test_llama import tiny_llama, write_gguf
from torch import nn

from glmstack.engine import native
from glmstack.engine.describe import describe
from glmstack.engine.loading.checkpoint import build_model, load_model, open_checkpoint
from glmstack.engine.quant.int4 import Int4Linear
from glmstack.engine.quant.int8 import Int8Linear
from glmstack.engine.quant.quantize_model import QuantizationReport, model_bytes, quantize_model


def llama_tied(path: Path) -> Path:
    # int4 down_proj: K=96, so group 64 falls back to 32
    tiny_llama(tie_word_embeddings=True).save_pretrained(path)
    return path


def llama_odd_ffn(path: Path) -> Path:
    tiny_llama(intermediate_size=40).save_pretrained(path)  # down_proj K=40: no int4 group fits, kept
    return path


def chatglm_odd_ffn(path: Path) -> Path:
    """ffn 44: dense_h_to_4h has 88 rows (int4 needs a multiple of 16) and dense_4h_to_h 44 inputs: both kept
    at int4; query_key_value has a bias."""
    sd = thudm_weights()
    g = torch.Generator().manual_seed(1)
    for name in list(sd):
        if name.endswith("dense_h_to_4h.weight"):
            sd[name] = torch.randn(88, H, generator=g) * 0.1
        elif name.endswith("dense_4h_to_h.weight"):
            sd[name] = torch.randn(H, 44, generator=g) * 0.1
    return write_thudm(path, sd, ffn_hidden_size=44)


def glm4(path: Path) -> Path:
    tiny_glm4().save_pretrained(path)
    return path


def chatglm_v1(path: Path) -> Path:
    return write_checkpoint(path, v1_weights(), "safetensors")  # lm_head tied to the embedding


def llama_q4_1_gguf(path: Path) -> Path:
    """Like the bundled SmolLM2: a tied Llama in a Q4_1 GGUF."""
    path.mkdir()
    write_gguf(tiny_llama(tie_word_embeddings=True), path / "tiny.gguf", "llama",
               quant=gguf.GGMLQuantizationType.Q4_1)
    return path / "tiny.gguf"


def llama3_rope_freqs_gguf(path: Path) -> Path:
    """A GGUF with a `rope_freqs` tensor: the model's persistent `rope_factors` buffer counts too."""
    path.mkdir()
    freqs = torch.linspace(1.0, 8.0, 8).numpy()  # head_dim 16 -> 8 divisors
    write_gguf(tiny_llama(), path / "l3.gguf", "llama", rope_freqs=freqs)
    return path / "l3.gguf"


CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "llama-tied": llama_tied,
    "llama-odd-ffn": llama_odd_ffn,
    "chatglm-odd-ffn": chatglm_odd_ffn,
    "glm4": glm4,
    "chatglm-v1-tied": chatglm_v1,
    "llama-q4_1-gguf": llama_q4_1_gguf,
    "llama3-rope-freqs-gguf": llama3_rope_freqs_gguf,
}
SKIPPED_AT_INT4 = {"llama-odd-ffn", "chatglm-odd-ffn"}


def quantized_load(path: Path, bits: int, group_size: int) -> tuple[nn.Module, QuantizationReport]:
    """The model as glmstack.load(quantize=...) makes it on CPU: loaded in bf16, then quantize_model."""
    model = load_model(path, device="cpu", dtype=torch.bfloat16).module
    report = quantize_model(model, bits, group_size=group_size)
    assert report.bytes_after == model_bytes(model)
    return model, report


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_describe_counts_what_a_quantized_load_holds(tmp_path: Path, arch: str, group_size: int) -> None:
    path = CHECKPOINTS[arch](tmp_path / arch)
    info = describe(path, group_size=group_size, device="cpu")
    replaced: list[str] = []
    for bits in (8, 4):
        _, report = quantized_load(path, bits, group_size)
        assert info["memory_bytes"][f"int{bits}"] == report.bytes_after, (arch, bits)
        if bits == 8:
            replaced = report.quantized
        else:
            assert bool(report.skipped) == (arch in SKIPPED_AT_INT4), report.skipped
    # the weights int8 replaces: every decoder-layer linear and the head
    unquantized = load_model(path, device="cpu", dtype=torch.bfloat16).module
    weights = [unquantized.get_submodule(name).weight for name in replaced]
    assert info["quantizable_parameters"] == sum(w.numel() for w in weights)
    assert info["memory_bytes"]["bf16"] == 2 * info["parameters"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", ["llama-tied", "chatglm-odd-ffn"])
def test_meta_quantization_builds_the_same_modules(tmp_path: Path, arch: str, bits: int) -> None:
    """quantize_model on the meta device (describe's) makes the modules, buffers, shapes and dtypes a real
    quantization makes; only the values are missing."""
    path = CHECKPOINTS[arch](tmp_path / arch)
    real, _ = quantized_load(path, bits, 32)
    _, meta = build_model(open_checkpoint(path))
    meta = meta.to(torch.bfloat16)
    meta.tie_weights()
    meta.init_buffers(torch.device("meta"))
    with pytest.raises(ValueError, match="meta device"):
        quantize_model(meta, bits)  # which device's kernels is not guessed
    quantize_model(meta, bits, device="cpu")
    assert meta.quantization == real.quantization

    def layout(model: nn.Module) -> dict[str, tuple]:
        return {name: (type(m).__name__, getattr(m, "packed_for", None),
                       {n: (tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(recurse=False),
                                                                  *m.named_buffers(recurse=False)]})
                for name, m in model.named_modules()}

    assert layout(meta) == layout(real)
    kinds = {type(m) for m in meta.modules()}
    assert Int8Linear in kinds and (Int4Linear in kinds) == (bits == 4)


def test_quantize_model_refuses_a_device_the_model_is_not_on(tmp_path: Path) -> None:
    model = load_model(llama_tied(tmp_path / "m"), device="cpu", dtype=torch.bfloat16).module
    with pytest.raises(ValueError, match="move it there"):
        quantize_model(model, 8, device="meta")


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_describe_bundled_model_matches_its_quantized_load(quantize: str) -> None:
    from glmstack import load
    from glmstack.engine.loading.catalog import bundled_model_path

    model, _ = load(device="cpu", quantize=quantize)
    assert describe(bundled_model_path(), device="cpu")["memory_bytes"][quantize] == model_bytes(model.module)


def test_describe_counts_atens_int4_layout_when_the_native_kernels_are_off(tmp_path: Path) -> None:
    path = llama_tied(tmp_path / "m")
    previous = native.set_enabled(False)
    try:
        model, report = quantized_load(path, 4, 32)
        assert {m.packed_for for m in model.modules() if isinstance(m, Int4Linear)} == {"cpu"}
        assert describe(path, device="cpu")["memory_bytes"]["int4"] == report.bytes_after
    finally:
        native.set_enabled(previous)
