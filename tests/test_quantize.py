"""Weight-only int8 / int4: each linear against the fp32 matmul of its own dequantized weights, whole models
against their unquantized selves, and GGUF Q4_0/Q4_1 and ChatGLM int4 weights converted exactly.

Thresholds. On CPU the quantized linears compute in bf16, so one linear differs from the fp32 matmul of its
own dequantized weights by bf16 rounding of activations and output: ~0.3% relative (measured), asserted
< 1%. A whole model differs from its unquantized self by the quantization noise: per-row int8 rounds to a
step of max|w|/127, ~0.5% of a Gaussian row's RMS; group-32 int4 to range/15, ~8%. Logits through two
layers and a head then keep a cosine similarity of about 1 - err²/2 to the fp32 model: measured ≥ 0.9999
(int8) and ≥ 0.993 (int4) on these random models; asserted > 0.999 and > 0.98, well above what a real
bug gives (swapping the two nibbles of each byte: 0.55).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from test_chatglm_v1 import GENERATED, PROMPT, v1_weights, write_checkpoint
from test_glm_models import thudm_weights, tiny_glm4, write_thudm
from test_llama import tiny_llama
from torch import nn

from glmstack.engine import native
from glmstack.engine.loading.checkpoint import load_model
from glmstack.engine.quant import int4 as q
from glmstack.engine.quant.embedding import QuantizedEmbedding
from glmstack.engine.quant.int4 import Int4Linear, quantize_int4
from glmstack.engine.quant.int8 import Int8Linear
from glmstack.engine.quant.prequantized import int4_weights_from_chatglm, int4_weights_from_gguf
from glmstack.engine.quant.quantize_model import model_bytes, quantize_model

LINEAR_TOL = 1e-2
COSINE = {8: 0.999, 4: 0.98}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    if bias:
        nn.init.normal_(layer.bias, std=0.5)  # large enough that a dropped bias shows
    return layer


# ---- single linears -------------------------------------------------------------------------------------

# (1,) and (2, 5) take the fused kernels, (80,) the dequantize-then-GEMM path of both classes.
LEADING = [(1,), (2, 5), (80,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [128, 40])  # 40: not a multiple of 16, so never the fused int8 kernel
def test_int8_linear_matches_dequantized_matmul(dtype, leading, bias, k) -> None:
    lin = linear(k, 96, bias)
    m = Int8Linear.from_linear(lin)
    x = torch.randn(*leading, k).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (*leading, 96)
    w = m.weight.float() * m.weight_scale.float()[:, None]
    assert rel_err(y, F.linear(x.float(), w, lin.bias)) < LINEAR_TOL
    assert rel_err(w, lin.weight.detach()) < 0.01  # and the dequantized weight is the original, within int8


def test_int8_uses_chatglm_scale_and_names() -> None:
    lin = linear(64, 32, True)
    m = Int8Linear.from_linear(lin, dtype=torch.float32)
    torch.testing.assert_close(m.weight_scale, lin.weight.detach().abs().amax(dim=1) / 127)
    assert m.weight.dtype == torch.int8 and int(m.weight.abs().max()) == 127
    assert set(m.state_dict()) == {"weight", "weight_scale", "bias"}  # ChatGLM int8 checkpoint keys


def test_int8_kernel_survives_misaligned_input() -> None:
    """The AVX-512 int8 kernel loads activations with aligned loads: a view 16 bytes into a buffer would
    crash the process if handed to it directly."""
    m = Int8Linear.from_linear(linear(128, 64, False))
    base = torch.randn(1024).bfloat16()
    x = base[8 : 8 + 2 * 128].view(2, 128)
    assert x.data_ptr() % 64
    torch.testing.assert_close(m(x), m(x.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_matches_dequantized_matmul(dtype, leading, bias, group) -> None:
    lin = linear(256, 80, bias)  # 80 rows: one full 64-row packing block and a partial one
    m = Int4Linear.from_linear(lin, group_size=group)
    x = torch.randn(*leading, 256).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (*leading, 80)
    w = quantize_int4(lin.weight.detach(), group, torch.bfloat16).dequantize()
    assert rel_err(y, F.linear(x.float(), w, lin.bias)) < LINEAR_TOL
    assert rel_err(w, lin.weight.detach()) < 0.15  # 4 bits of a uniform weight: ~8% RMS


def test_int4_packing_layout_is_recognised() -> None:
    """The prompt path reads ATen's packed int4 layout back; if a torch release changes it, the layout probe
    must notice (and the fused kernel is used instead)."""
    assert q._cpu_int4_layout() is not None


def test_int4_refuses_shapes_the_kernel_cannot_take() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        Int4Linear.from_linear(linear(64, 40, False), group_size=32)
    with pytest.raises(ValueError, match="multiple of the group size"):
        Int4Linear.from_linear(linear(96, 32, False), group_size=64)


# ---- weights that arrive quantized ------------------------------------------------------------------------


def random_blocks(qtype: GGMLQuantizationType, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Q4_0 / Q4_1 rows of random blocks: fp16 d (and m), 16 bytes of nibbles per 32 weights."""
    rng = np.random.default_rng(seed)
    count = n * k // 32
    fields = [(rng.random(count) * 0.02 + 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)]
    if qtype == GGMLQuantizationType.Q4_1:
        fields.append((-rng.random(count) * 0.15).astype(np.float16).view(np.uint8).reshape(-1, 2))
    fields.append(rng.integers(0, 256, (count, 16), dtype=np.uint8))
    return np.concatenate(fields, axis=1).reshape(n, -1)


@contextmanager
def fp32_activations() -> Iterator[None]:
    """The native kernels on fp32 activations (the VNNI path's int8 activations round 1.0 to 127 · (1/127)),
    for tests that read weights back through x = identity."""
    nk = native.kernels()
    previous = nk.set_vnni(False) if nk is not None else None
    try:
        yield
    finally:
        if nk is not None:
            nk.set_vnni(previous)


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_q4_blocks_convert_exactly(qtype) -> None:
    n, k = 48, 128
    raw = random_blocks(qtype, n, k)
    oracle = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    weights = int4_weights_from_gguf(raw, qtype, (n, k))
    assert torch.equal(weights.dequantize(), oracle)
    # the kernel itself, with float32 scales and fp32 activations, reproduces every weight bit for bit
    # (x = identity; the VNNI path's int8 activations would round 1.0 to 127 · (1/127))
    exact = Int4Linear.from_weights(weights, dtype=torch.float32)
    with fp32_activations():
        assert torch.equal(exact(torch.eye(k)).t(), oracle)
    # the fast bf16 path rounds d and m + 8d to 8 mantissa bits: close, not equal
    fast = Int4Linear.from_weights(weights, dtype=torch.bfloat16)
    assert rel_err(fast(torch.eye(k)).t(), oracle) < 1e-2
    # row operations (Llama's q/k un-permutation, fusing q/k/v) commute with the conversion
    flipped = weights.map_rows(lambda t: t.flip(0))
    fused = type(weights).cat([flipped, weights])
    assert torch.equal(fused.dequantize(), torch.cat([oracle.flip(0), oracle]))


def test_chatglm_int4_checkpoint_converts_exactly() -> None:
    """spec 7.2: int8 [out, in/2], even element in the high nibble, symmetric -7..7, one scale per row."""
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-7, 8, (32, 256), generator=g)
    scale = torch.rand(32, generator=g) * 0.01
    packed = ((values[:, 0::2] << 4) | (values[:, 1::2] & 0xF)).to(torch.int8)
    weights = int4_weights_from_chatglm(packed, scale, group_size=128)
    expected = values.float() * scale[:, None]
    assert torch.equal(weights.dequantize(), expected)
    m = Int4Linear.from_weights(weights, dtype=torch.float32)
    with fp32_activations():
        assert torch.equal(m(torch.eye(256)).t(), expected)


# ---- whole models ------------------------------------------------------------------------------------------


def quantizable_names(model: nn.Module) -> set[str]:
    head = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (".layers." in f".{name}" or name == head)}


def expected_saving(model: nn.Module, names: set[str], bits: int, group: int, tied_head: str | None) -> int:
    """Bytes quantization should save, from the shapes alone (bf16 scales; int8 head)."""
    saved = 0
    for name in names:
        lin = model.get_submodule(name)
        n, k = lin.weight.shape
        old = 0 if name == tied_head else lin.weight.numel() * lin.weight.element_size()
        if bits == 8 or name == tied_head or name.endswith(("lm_head", "output_layer")):
            new = n * k + 2 * n
        else:
            new = n * k // 2 + (k // group) * n * 2 * 2
        saved += old - new
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    v, d = embedding.weight.shape
    if bits == 8:  # int8 rows, shared with a tied head's (counted above)
        new = 0 if tied_head else v * d + 2 * v
    else:
        new = v * d // 2 + (d // 32) * v * 2 * 2
    return saved + embedding.weight.numel() * embedding.weight.element_size() - new


def llama_checkpoint(tmp_path: Path, tied: bool) -> Path:
    tiny_llama(tie_word_embeddings=tied).save_pretrained(tmp_path)
    return tmp_path


def thudm_checkpoint(tmp_path: Path, tied: bool) -> Path:
    return write_thudm(tmp_path, thudm_weights())


def glm4_checkpoint(tmp_path: Path, tied: bool) -> Path:
    tiny_glm4().save_pretrained(tmp_path)
    return tmp_path


def v1_checkpoint(tmp_path: Path, tied: bool) -> Path:
    return write_checkpoint(tmp_path, v1_weights(), "safetensors")


ARCHS = {
    "llama": (llama_checkpoint, False),
    "llama-tied": (llama_checkpoint, True),
    "chatglm": (thudm_checkpoint, False),
    "glm4": (glm4_checkpoint, False),
    "chatglm-v1": (v1_checkpoint, True),  # ChatGLM-6B ties lm_head to the embedding
}


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    ids = torch.tensor([PROMPT + GENERATED]) if arch == "chatglm-v1" else \
        torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1])[None]).flatten().double()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_model_stays_close(tmp_path: Path, arch: str, bits: int) -> None:
    write, tied = ARCHS[arch]
    model = load_model(write(tmp_path, tied), device="cpu", dtype="float32").module
    before = logits(model, arch)
    names = quantizable_names(model)
    head = getattr(model, "output_weight_name", "lm_head.weight").rsplit(".", 1)[0]
    embedding = next(m for m in model.modules() if isinstance(m, nn.Embedding))
    embedding_weight = embedding.weight.detach().clone()
    saving = expected_saving(model, names, bits, q.DEFAULT_GROUP_SIZE, head if tied else None)

    report = quantize_model(model, bits)

    assert set(report.quantized) == names and not report.skipped
    assert model.quantization == f"int{bits}"
    assert isinstance(model.get_submodule(head), Int8Linear)  # the head is int8 for both
    layer_types = {type(model.get_submodule(n)) for n in names - {head}}
    assert layer_types == {Int8Linear if bits == 8 else Int4Linear}
    cosine = F.cosine_similarity(logits(model, arch), before, dim=0).item()
    assert cosine > COSINE[bits], cosine
    assert report.bytes_before - report.bytes_after == saving
    assert report.bytes_after == model_bytes(model)
    # the embedding is quantized too (int4 rows for bits=4, int8 for 8), its lookups within a step of its rows
    quantized = next(m for m in model.modules() if isinstance(m, QuantizedEmbedding))
    assert quantized.bits == bits and report.embedding_bits == bits
    rows = quantized(torch.arange(embedding_weight.shape[0]))
    assert rows.dtype == torch.float32 and rows.shape == embedding_weight.shape
    ranges = embedding_weight.abs().amax(dim=1, keepdim=True)
    # half a step (max/254 for int8, a group's range/30 for int4), plus the bf16 rounding of the scales
    assert bool(((rows - embedding_weight).abs() <= ranges / (100 if bits == 8 else 12) + 1e-6).all())
    if tied and bits == 8:  # one copy of the rows: the head's
        assert quantized.weight.data_ptr() == model.get_submodule(head).weight.data_ptr()


def test_second_quantize_and_zero_bits_are_no_ops(tmp_path: Path, caplog) -> None:
    model = load_model(llama_checkpoint(tmp_path, True), device="cpu", dtype="float32").module
    assert quantize_model(model, 0).quantized == [] and not hasattr(model, "quantization")
    quantize_model(model, 4)
    modules = dict(model.named_modules())
    with caplog.at_level(logging.INFO, logger="glmstack.engine.quant.quantize_model"):
        report = quantize_model(model, 8)
    assert "already quantized" in caplog.text
    assert report.quantized == [] and report.bits == 4 and model.quantization == "int4"
    assert dict(model.named_modules()) == modules
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, 3)


def test_unquantizable_linears_are_kept_and_reported() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd_rows = nn.Linear(64, 40)  # int4 needs out_features % 16 == 0
            self.odd_cols = nn.Linear(48, 32)  # not a multiple of 32: no int4 group fits
            self.k96 = nn.Linear(96, 32)  # group 64 does not divide 96: falls back to 32

    model = nn.Module()
    model.layers = nn.ModuleList([Block()])
    model.lm_head = nn.Linear(64, 16)
    report = quantize_model(model, 4, group_size=64)
    assert set(report.skipped) == {"layers.0.odd_rows", "layers.0.odd_cols"}
    assert model.layers[0].k96.group_size == 32 and isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.layers[0].odd_rows, nn.Linear)


@pytest.mark.slow
def test_load_with_quantize_picks_bf16_and_chats() -> None:
    from glmstack import load

    model, tokenizer = load(device="cpu", quantize="int4")
    assert model.dtype == torch.bfloat16 and model.module.quantization == "int4"
    reply, _ = model.chat(tokenizer, "Name a colour.", do_sample=False, max_new_tokens=8)
    assert reply.strip()
    assert model.quantize(8) is model and model.module.quantization == "int4"
    with pytest.raises(ValueError, match="quantize"):
        load(device="cpu", quantize="int3")
