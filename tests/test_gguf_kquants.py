"""GGUF block types (K-quants, Q5, Q8_0, IQ4_NL) in the engine's native int4/int8 forms, and the torch
dequantizers behind them, against the gguf package's reference dequantizers.

Every bit pattern is a valid block, so the blocks here are random bytes, with the fp16 scale fields
overwritten by finite values in [1e-3, 0.1] (random fp16 bits would include inf/NaN). Shapes have two
256-weight super-blocks (sixteen 32-weight blocks) per row and several rows.

Bounds. Exact types (Q4_0, Q4_1, Q4_K) equal gguf's dequantization; for Q4_K up to the one float32 rounding
of each zero (8·d·sc - dmin·m), so within a few ulps of the group's largest term. Requantized types: every
weight lies within half a step of its group's (int4) or row's (int8) grid, or at the grid's end where the
grid clips it, with the codes chosen against the scales as stored; int4's least-squares refit never leaves
a group worse than plain min/max and lowers the RMS error on these blocks by > 5% (measured 8-15%).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from glmstack.engine.loading import gguf_file
from glmstack.engine.loading.gguf_file import _TORCH_DEQUANT, dequantize_raw
from glmstack.engine.quant import prequantized
from glmstack.engine.quant.int4 import Int4Weights, quantize_int4
from glmstack.engine.quant.int8 import Int8Weights
from glmstack.engine.quant.prequantized import (
    GGUF_NATIVE_BITS,
    int4_weights_from_gguf,
    native_weights_from_gguf,
)

Q = GGMLQuantizationType
N, K = 48, 512
# byte offsets of each type's fp16 scale fields (d, and dmin / m where the type has one)
F16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
              Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,)}
INT4_REQUANT = [t for t, bits in GGUF_NATIVE_BITS.items() if bits == 4 and t not in (Q.Q4_0, Q.Q4_1, Q.Q4_K)]
INT8_REQUANT = [t for t, bits in GGUF_NATIVE_BITS.items() if bits == 8]
EPS = torch.finfo(torch.float32).eps


def random_blocks(qtype: GGMLQuantizationType, n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n * k // block, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        sane = (rng.random(len(raw)) * 0.099 + 1e-3).astype(np.float16)
        raw[:, offset : offset + 2] = sane.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


def oracle(raw: np.ndarray, qtype: GGMLQuantizationType, n: int = N, k: int = K) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).square().mean() / b.square().mean()).sqrt())


def test_every_native_type_has_a_table_entry() -> None:
    assert set(GGUF_NATIVE_BITS.values()) == {4, 8}
    assert set(GGUF_NATIVE_BITS) <= set(F16_FIELDS)  # each is tested below
    assert set(_TORCH_DEQUANT) <= set(F16_FIELDS)


# ---- torch dequantizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(_TORCH_DEQUANT), ids=lambda t: t.name)
def test_torch_dequantizer_equals_gguf(qtype, monkeypatch) -> None:
    raw = random_blocks(qtype)
    expected = oracle(raw, qtype)
    assert torch.equal(_TORCH_DEQUANT[qtype](torch.from_numpy(raw.copy()), (N, K)), expected)
    # dequantize_raw in row chunks (5 rows here: 48 = 9·5 + 3), from a read-only view as the file map gives
    monkeypatch.setattr(gguf_file, "DEQUANT_CHUNK", 5 * K)
    readonly = raw.copy()
    readonly.flags.writeable = False
    assert torch.equal(dequantize_raw(readonly, qtype, (N, K)), expected)


def test_dequantize_raw_refuses_a_wrong_size_and_falls_back_to_gguf() -> None:
    raw = random_blocks(Q.Q4_K)
    with pytest.raises(ValueError, match="do not hold"):
        dequantize_raw(raw, Q.Q4_K, (N + 1, K))
    # a type without a torch dequantizer goes to the gguf package's (IQ4_XS: 136 bytes per 256)
    iq4_xs = np.random.default_rng(1).integers(0, 256, (N, K // 256 * 136), dtype=np.uint8)
    iq4_xs.reshape(-1, 136)[:, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    assert Q.IQ4_XS not in _TORCH_DEQUANT
    assert torch.equal(dequantize_raw(iq4_xs, Q.IQ4_XS, (N, K)), oracle(iq4_xs, Q.IQ4_XS))


# ---- exact int4 ------------------------------------------------------------------------------------------


def test_q4_k_converts_exactly() -> None:
    raw = random_blocks(Q.Q4_K)
    expected = oracle(raw, Q.Q4_K)
    weights = native_weights_from_gguf(raw, Q.Q4_K, (N, K))
    assert isinstance(weights, Int4Weights) and weights.group_size == 32
    assert weights.codes.dtype == torch.uint8 and int(weights.codes.max()) <= 15
    assert weights.scales.dtype == torch.float32 and weights.scales.shape == (N, K // 32)
    # scale = d·sc exactly, against gguf's own unpacking of the 6-bit scales
    blocks = raw.reshape(-1, 144)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    sc, _ = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    assert torch.equal(weights.scales, torch.from_numpy((d * sc.astype(np.float32)).reshape(N, K // 32)))
    # every weight to float32 rounding of the zero: a few ulps of the group's largest term. A wrong nibble
    # order or scale/min unpacking is off by whole steps (scale ~0.06 on average here, bound ~1e-5).
    got = weights.dequantize()
    bound = (4 * EPS * (16 * weights.scales.abs() + weights.zeros.abs())).repeat_interleave(32, dim=1)
    assert bool(((got - expected).abs() <= bound).all())
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert torch.equal(int4_weights_from_gguf(raw, Q.Q4_K, (N, K)).codes, weights.codes)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_q4_0_and_q4_1_stay_bit_exact(qtype) -> None:
    raw = random_blocks(qtype)
    weights = native_weights_from_gguf(raw, qtype, (N, K))
    assert isinstance(weights, Int4Weights)
    assert torch.equal(weights.dequantize(), oracle(raw, qtype))


# ---- requantized int4 / int8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", INT4_REQUANT, ids=lambda t: t.name)
def test_int4_requantized_types(qtype, scale_dtype, monkeypatch) -> None:
    monkeypatch.setattr(prequantized, "REQUANT_CHUNK", 7 * K)  # several row chunks, a short last one
    raw = random_blocks(qtype)
    expected = oracle(raw, qtype)
    weights = native_weights_from_gguf(raw, qtype, (N, K), scale_dtype=scale_dtype)
    assert isinstance(weights, Int4Weights) and weights.group_size == 32 and int(weights.codes.max()) <= 15
    # scales and zeros as the kernel will hold them (rounded to scale_dtype before the codes were chosen)
    assert torch.equal(weights.scales.to(scale_dtype).float(), weights.scales)
    assert torch.equal(weights.zeros.to(scale_dtype).float(), weights.zeros)
    assert bool((weights.scales > 0).all())
    # each weight within half a step of its group's grid, or at the grid's end where the grid clips it
    got = weights.dequantize()
    step = weights.scales.repeat_interleave(32, dim=1)
    zero = weights.zeros.repeat_interleave(32, dim=1)
    outside = torch.clamp(torch.maximum((zero - 8 * step) - expected, expected - (zero + 7 * step)), min=0)
    assert bool(((got - expected).abs() <= step / 2 * (1 + 1e-5) + outside + 1e-6).all())
    # the refit never leaves a group worse than plain min/max, and lowers the error overall
    plain = quantize_int4(expected, 32, scale_dtype).dequantize()
    group_sse = (got - expected).square().view(N, -1, 32).sum(-1)
    plain_sse = (plain - expected).square().view(N, -1, 32).sum(-1)
    assert bool((group_sse <= plain_sse * (1 + 1e-5) + 1e-9).all())
    err, plain_err = rel_rms(got, expected), rel_rms(plain, expected)
    print(f"{qtype.name} -> int4 ({scale_dtype}): relative RMS {err:.4f} (min/max alone {plain_err:.4f})")
    assert err < 0.95 * plain_err  # measured 0.87-0.92 here; ~0.81 on ggml-quantized Gaussian weights
    assert err < 0.12  # measured 0.05-0.09 on these random blocks


@pytest.mark.parametrize("qtype", INT8_REQUANT, ids=lambda t: t.name)
def test_int8_requantized_types(qtype, monkeypatch) -> None:
    monkeypatch.setattr(prequantized, "REQUANT_CHUNK", 7 * K)
    raw = random_blocks(qtype)
    expected = oracle(raw, qtype)
    weights = native_weights_from_gguf(raw, qtype, (N, K))
    assert isinstance(weights, Int8Weights)
    assert weights.weight.dtype == torch.int8 and weights.weight.shape == (N, K)
    assert weights.scale.dtype == torch.bfloat16 and weights.scale.shape == (N,)
    # quantize_int8's formula: scale = max|row| / 127 (in bf16), codes within -127..127 and within half a
    # step of every weight (a step of bf16 rounding may push a row's largest weight to the clamp)
    scale = weights.scale.float()[:, None]
    assert torch.allclose(weights.scale.float(), expected.abs().amax(dim=1) / 127, rtol=2 ** -8, atol=0)
    assert int(weights.weight.abs().max()) <= 127
    err_max = (weights.dequantize() - expected).abs() / scale
    assert float(err_max.max()) <= 0.5 + 0.5 + 1e-3  # ≤ ½ step, or a clipped maximum off by a bf16 ulp
    assert float(err_max.quantile(0.999)) <= 0.5 + 1e-4
    err = rel_rms(weights.dequantize(), expected)
    print(f"{qtype.name} -> int8: relative RMS {err:.4f}")
    assert err < 0.02  # per-row int8 on these blocks: ~0.6-1%


def test_unconvertible_types_raise_naming_the_type() -> None:
    for qtype in (Q.F16, Q.BF16, Q.F32, Q.IQ2_XXS, Q.Q8_K):
        with pytest.raises(ValueError, match=qtype.name):
            native_weights_from_gguf(np.zeros(64, dtype=np.uint8), qtype, (4, 8))
    with pytest.raises(ValueError, match="Q5_0"):
        int4_weights_from_gguf(random_blocks(Q.Q5_0), Q.Q5_0, (N, K))


def test_int8_weights_row_operations() -> None:
    """map_rows / cat act on weight and scale together (Llama's q/k un-permutation, fusing q/k/v)."""
    raw = random_blocks(Q.Q6_K)
    weights = native_weights_from_gguf(raw, Q.Q6_K, (N, K))
    assert isinstance(weights, Int8Weights)
    dense = weights.dequantize()
    flipped = weights.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), dense.flip(0))
    fused = Int8Weights.cat([flipped, weights])
    assert torch.equal(fused.dequantize(), torch.cat([dense.flip(0), dense]))
    with pytest.raises(AssertionError):
        Int8Weights.cat([weights, Int8Weights(weights.weight, weights.scale.float())])
