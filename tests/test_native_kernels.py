"""The native decode kernels (glmstack/engine/native) against plain fp32 PyTorch, and the ATen fallback.

Skipped only where the CPU has no AVX-512 (the kernels are not built there); anywhere else a failed build
fails these tests.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmstack.engine import native
from glmstack.engine.kv_cache import PagedKVCache
from glmstack.engine.models.layers import RMSNorm
from glmstack.engine.models.llama import LlamaConfig, LlamaForCausalLM
from glmstack.engine.quant.int4 import (
    INT4_NATIVE_MAX_ROWS,
    Int4Linear,
    int4_from_lanes,
    int4_to_lanes,
    pack_int4_native,
    quantize_int4,
)
from glmstack.engine.quant.int8 import Int8Linear, int8_from_lanes, int8_to_lanes, quantize_int8
from glmstack.engine.quant.linear_base import NATIVE_MAX_ROWS, permute_tiles_in_place
from glmstack.engine.quant.quantize_model import quantize_model
from glmstack.engine.serving.runner import ModelRunner
from glmstack.engine.serving.scheduler import ScheduledChunk, Sequence, StepPlan

if "AVX512" not in torch.backends.cpu.get_cpu_capability():
    pytest.skip("the native kernels are built for AVX-512 CPUs only", allow_module_level=True)


@pytest.fixture(scope="module")
def nk():
    module = native.kernels()
    assert module is not None, "AVX-512 CPU but the native kernels did not build (see the log)"
    return module


@pytest.fixture
def vnni_nk(nk):
    """The kernels, on a CPU with AVX512-VNNI (the lane layouts' tests are skipped elsewhere)."""
    if not nk.vnni_supported():
        pytest.skip("the CPU has no AVX512-VNNI")
    return nk


@pytest.fixture
def aten_only():
    previous = native.set_enabled(False)
    yield
    native.set_enabled(previous)


@contextlib.contextmanager
def kernel_activations(nk, path: str) -> Iterator[str]:
    """int8_linear and int4_linear on `path`: "fp32" (fp32 activations) or "vnni" (int8 activations +
    AVX512-VNNI; skips the test where the CPU has no VNNI)."""
    if path == "vnni" and not nk.vnni_supported():
        pytest.skip("the CPU has no AVX512-VNNI")
    previous = nk.set_vnni(path == "vnni")
    try:
        yield path
    finally:
        nk.set_vnni(previous)


@pytest.fixture(params=["fp32", "vnni"])
def activation_path(request, nk) -> Iterator[str]:
    """Runs the test on each int4_linear path."""
    with kernel_activations(nk, request.param) as path:
        yield path


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-2  # bf16 in/out rounds to 8 bits of mantissa


def ref_input(x: torch.Tensor, norm_w: torch.Tensor | None, silu_mul: bool, eps: float) -> torch.Tensor:
    x = x.float()
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    if norm_w is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm_w.float(), eps)
    return x


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x (fp32 [M, K]) as the VNNI int4 path sees it: per block of 32 inputs, dx = max|x| / 127 and
    x^ = dx * round(x * (127 / max|x|)), in the kernel's fp32 operations; blocks under 1e-30 become 0."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    live = amax >= 1e-30
    inv = torch.where(live, 127 / amax, torch.zeros_like(amax))
    codes = (blocks * inv).round()
    return (codes * (amax / 127)).reshape(m, k)


def int8_activation_bound(x: torch.Tensor, w: torch.Tensor) -> float:
    """The most ||x^ w.T - x w.T||_F (Frobenius, over all outputs) that int8 activations can add: rounding
    to the nearest code moves each element by at most dx_b / 2 (dx_b = max|x| over its block / 127), so the
    error matrix E = x^ - x has ||E||_F <= ||dx / 2||_F, and ||E w.T||_F <= ||w||_2 ||E||_F (spectral norm)."""
    m, k = x.shape
    half_dx = x.float().reshape(m, k // 32, 32).abs().amax(-1) / 127 / 2
    return torch.linalg.matrix_norm(w.float(), ord=2).item() * half_dx.norm().item() * math.sqrt(32)


def int4_close(y: torch.Tensor, ref: torch.Tensor, x_in: torch.Tensor, w: torch.Tensor, path: str) -> bool:
    """y against the exact fp32 reference: within tol(y.dtype) on the fp32 path; on the VNNI path within
    the int8-activation bound above (x_in: the fp32 input the kernel quantizes), plus the same rounding."""
    err, size = (y.float() - ref.float()).norm().item(), ref.float().norm().item()
    allowed = tol(y.dtype) * size
    if path == "vnni":
        allowed += int8_activation_bound(x_in, w)
    return err <= allowed


# ---- int8 / int4 GEMV against the dequantized fp32 matmul --------------------------------------------------

SHAPES = [(1, 100, 7), (2, 577, 33), (3, 64, 1), (5, 576, 64), (8, 1536, 19), (1, 17, 3)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized_reference(nk, activation_path, m, k, n, dtype, bias) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w = torch.randn(n, k, generator=g)
    q, scale = quantize_int8(w, torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    y = nk.int8_linear(x, q, scale, b)
    # the VNNI path takes K in blocks of 32 (other widths keep fp32 activations): a Q8 x Q8 dot, exact on
    # the int8 activations it sees
    x_seen = int8_activations(x.float()) if activation_path == "vnni" and k % 32 == 0 else x.float()
    ref = F.linear(x_seen, q.float() * scale.float()[:, None], None if b is None else b.float())
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < tol(dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_row_computes_the_same_bits_whatever_else_the_call_holds(nk, bits) -> None:
    """One numerics per precision: on the VNNI path row i of a 300-row call (a prompt: weights unpacked once
    per tile of rows) equals the same row alone (decode: weights straight from memory), bit for bit, with
    every fused transform - so a token's logits never depend on how its serving step was composed."""
    if nk.activation_path() != "vnni":
        pytest.skip("the fp32-activation path takes prompts by dequantize + GEMM")
    g = torch.Generator().manual_seed(bits)
    k, n = 192, (100 if bits == 8 else 112)  # n % 8 != 0: the last rows take the one-row tile (int8)
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
    module = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size=32)
    norm = RMSNorm(k, 1e-5)
    x, residual = torch.randn(300, 2 * k, generator=g), torch.randn(300, n, generator=g)
    for fused in ({}, {"norm": norm}, {"silu_mul": True}, {"residual": residual}):
        width = 2 * k if fused.get("silu_mul") else k
        rows = x[:, :width].contiguous()
        whole = module.native_forward(rows, **fused)
        assert whole is not None
        for i in (0, 3, 4, 150, 299):
            alone = dict(fused, residual=residual[i : i + 1]) if "residual" in fused else fused
            one = module.native_forward(rows[i : i + 1], **alone)
            assert one is not None and torch.equal(one[0], whole[i]), (bits, fused.keys(), i)
        assert torch.equal(module.native_forward(rows[5:12], **(
            dict(fused, residual=residual[5:12]) if "residual" in fused else fused)), whole[5:12])


@pytest.mark.parametrize("m,k,n,group", [(1, 64, 5, 32), (1, 64, 5, 64), (3, 160, 33, 32), (8, 576, 17, 32),
                                         (8, 576, 17, 64), (4, 1536, 1, 32), (4, 1536, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantized_reference(nk, activation_path, m, k, n, group, dtype, scale_dtype) -> None:
    """Each path computes exactly what it approximates: the VNNI path w . x^ (x as int8 blocks), the fp32
    path w . x, both to fp32 rounding (bf16 rounding of the output)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    weights = quantize_int4(torch.randn(n, k, generator=g), group, scale_dtype)
    packed, sz = pack_int4_native(weights, scale_dtype)
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = nk.int4_linear(x, packed, sz, bias)
    x_seen = int8_activations(x.float()) if activation_path == "vnni" else x.float()
    ref = F.linear(x_seen, weights.dequantize(), bias)
    assert y.dtype == dtype and rel_err(y, ref) < tol(dtype)


# K = 576 and 160 end in a short chunk (64 and 32 inputs past the last 128); group 192 puts group boundaries
# inside a chunk; 128 and 256 have one scale per chunk.
@pytest.mark.parametrize("k,group", [(576, 32), (576, 64), (160, 32), (640, 128), (768, 256), (576, 192)])
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_against_fp32_path_and_reference(nk, k, group, m, dtype) -> None:
    g = torch.Generator().manual_seed(k * 10 + group + m)
    n = 38  # 9 tiles of 4 weight rows, then 2 single rows
    weights = quantize_int4(torch.randn(n, k, generator=g), group, torch.bfloat16)
    packed, sz = pack_int4_native(weights, torch.bfloat16)
    w = weights.dequantize()
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    with kernel_activations(nk, "vnni"):
        vnni = nk.int4_linear(x, packed, sz, bias)
    with kernel_activations(nk, "fp32"):
        fp32 = nk.int4_linear(x, packed, sz, bias)
    exact = F.linear(x.float(), w, bias)
    assert rel_err(fp32, exact) < tol(dtype)
    assert rel_err(vnni, F.linear(int8_activations(x.float()), w, bias)) < tol(dtype)
    assert int4_close(vnni, exact, x.float(), w, "vnni")
    assert int4_close(vnni, fp32, x.float(), w, "vnni")  # the two paths differ by the activation rounding only


# Lane layout (native/int4_lanes.h): what Int4Linear holds on a VNNI CPU. The same bits as the row layout's
# kernel for any row count, group, scale dtype and fused input/output, on both activation paths.
@pytest.mark.parametrize("m", [1, 2, 7, 8, 13, 40])
@pytest.mark.parametrize("k,group", [(576, 32), (576, 64), (160, 32), (640, 128), (576, 192)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_lane_layout_gives_the_row_layouts_bits(nk, activation_path, m, k, group, scale_dtype) -> None:
    g = torch.Generator().manual_seed(m * 7 + k + group)
    n = 48
    weights = quantize_int4(torch.randn(n, k, generator=g), group, scale_dtype)
    packed, sz = pack_int4_native(weights, scale_dtype)
    lanes, lane_sz = int4_to_lanes(packed, sz)
    assert not torch.equal(lanes, packed)  # a real permutation
    back = int4_from_lanes(lanes, lane_sz)
    assert torch.equal(back[0], packed) and torch.equal(back[1], sz)
    bias, norm_w = torch.randn(n, generator=g), torch.rand(k, generator=g) + 0.5
    x = torch.randn(m, k, generator=g)
    residual = torch.randn(m, n, generator=g)
    assert torch.equal(nk.int4_linear_lanes(x, lanes, lane_sz, bias), nk.int4_linear(x, packed, sz, bias))
    fused = dict(norm_weight=norm_w, eps=1e-5, residual=residual)
    assert torch.equal(nk.int4_linear_lanes(x, lanes, lane_sz, None, **fused),
                       nk.int4_linear(x, packed, sz, None, **fused))
    gate_up = torch.randn(m, 2 * k, generator=g)
    assert torch.equal(nk.int4_linear_lanes(gate_up, lanes, lane_sz, bias, silu_mul=True),
                       nk.int4_linear(gate_up, packed, sz, bias, silu_mul=True))


def test_int4_linear_holds_lanes_on_vnni_and_saves_rows(vnni_nk) -> None:
    """Int4Linear goes to the lane layout where the kernel reads it (a CPU with VNNI), gives the row layout
    back for checkpoints, and computes the same on every path: the native kernel with VNNI on and off,
    and with the native kernels switched off (the module's own fallback)."""
    nk = vnni_nk
    g = torch.Generator().manual_seed(5)
    linear = nn.Linear(256, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
    weights = quantize_int4(linear.weight.detach(), 32, torch.bfloat16)
    packed, sz = pack_int4_native(weights, torch.bfloat16)
    m = Int4Linear.from_linear(linear, group_size=32)
    assert m.lanes and m._kernel == "int4_linear_lanes"
    rows = m.row_layout()
    assert torch.equal(rows[0], packed) and torch.equal(rows[1], sz)
    again = Int4Linear.from_native_packed(packed.clone(), sz.clone(), 32)  # takes them over
    assert again.lanes and torch.equal(again.weight, m.weight)
    on_meta = weights.map_rows(lambda t: t.to("meta"))  # how quantize_model counts a model's memory
    with kernel_activations(nk, "fp32"):  # GLMSTACK_VNNI=0: the fp32 path reads the row layout
        assert not Int4Linear.from_linear(linear, group_size=32).lanes
    assert not Int4Linear.from_weights(on_meta, device="meta", for_device="cpu").lanes
    x = torch.randn(3, 256, generator=g)
    expected = nk.int4_linear(x, packed, sz, m.bias)
    assert torch.equal(m(x), expected)
    with kernel_activations(nk, "fp32"):
        assert torch.equal(m(x), nk.int4_linear(x, packed, sz, m.bias))
    previous = native.set_enabled(False)
    try:
        assert rel_err(m(x), F.linear(x, weights.dequantize(), m.bias)) < 1e-2
    finally:
        native.set_enabled(previous)


@pytest.mark.parametrize("k", [64, 576, 2048])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_lane_layout_computes_w_dot_quantized_x_row_by_row(vnni_nk, k, scale_dtype) -> None:
    """int8 weights in lane layout (what Int8Linear holds on a VNNI CPU): w . x^ (x as int8 blocks) to fp32
    rounding, with the fused norm / silu / residual; each row's result the same bits whatever else the call
    holds; and with the VNNI path off, exactly int8_linear's fp32 path."""
    nk = vnni_nk
    g = torch.Generator().manual_seed(k)
    n, m = 48, 13
    weight, scale = quantize_int8(torch.randn(n, k, generator=g), scale_dtype)
    lanes = int8_to_lanes(weight)
    assert lanes.dtype == torch.int8 and not torch.equal(lanes, weight)
    assert torch.equal(int8_from_lanes(lanes), weight)
    w = weight.float() * scale.float()[:, None]
    bias, residual = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    x = torch.randn(m, k, generator=g)
    y = nk.int8_linear_lanes(x, lanes, scale, bias)
    assert rel_err(y, F.linear(int8_activations(x), w, bias)) < 1e-5
    rows = torch.cat([nk.int8_linear_lanes(x[i : i + 1], lanes, scale, bias) for i in range(m)])
    assert torch.equal(rows, y)
    norm_w = torch.rand(k, generator=g) + 0.5
    fused = nk.int8_linear_lanes(x, lanes, scale, bias, norm_w, 1e-5, False, residual)
    normed = ref_input(x, norm_w, False, 1e-5)
    assert rel_err(fused, F.linear(int8_activations(normed), w, bias) + residual) < 1e-5
    with kernel_activations(nk, "fp32"):
        assert torch.equal(nk.int8_linear_lanes(x, lanes, scale, bias), nk.int8_linear(x, weight, scale, bias))


def test_int8_linear_holds_lanes_and_a_tied_head_keeps_rows(vnni_nk) -> None:
    """quantize_model puts int8 linears in lane layout (VNNI CPUs), in place a slice at a time (the same bytes
    as converting whole), except a head whose rows the embedding shares; checkpoints get row layout back."""
    nk = vnni_nk
    g = torch.Generator().manual_seed(3)
    linear = nn.Linear(512, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
    module = Int8Linear.from_linear(linear)
    rows = module.weight.clone()
    with kernel_activations(nk, "fp32"):  # GLMSTACK_VNNI=0: the fp32 path reads the row layout
        module.use_lanes()
        assert not module.lanes
    module.use_lanes()
    assert module.lanes and torch.equal(module.weight, int8_to_lanes(rows)) and torch.equal(module.row_weight(), rows)
    x = torch.randn(2, 512, generator=g)
    assert torch.equal(module(x), nk.int8_linear_lanes(x, int8_to_lanes(rows), module.weight_scale))
    previous = native.set_enabled(False)
    try:  # the module's own fallback reads the row layout back
        assert rel_err(module(x), F.linear(x, rows.float() * module.weight_scale.float()[:, None])) < 1e-2
    finally:
        native.set_enabled(previous)
    big = torch.randint(-127, 128, (4112, 4096), dtype=torch.int8, generator=g)  # two slices of rows
    expected = int8_to_lanes(big)
    permute_tiles_in_place((big,), lambda w: (int8_to_lanes(w),), 16)
    assert torch.equal(big, expected)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.tie_weights()
    quantize_model(model, 8)
    assert not model.lm_head.lanes  # its rows are the embedding's
    assert model.model.layers[0].self_attn.o_proj.lanes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vnni_outlier_and_zero_blocks(nk, dtype) -> None:
    """A block whose scale comes from one huge element (its other inputs round to 0 or near it), an all-zero
    block (dx = 0: no 0/0) and an all-zero row: finite, and the same answer as w . x^ and within the bound."""
    g = torch.Generator().manual_seed(11)
    m, k, n = 4, 576, 20
    weights = quantize_int4(torch.randn(n, k, generator=g), 32, torch.bfloat16)
    packed, sz = pack_int4_native(weights, torch.bfloat16)
    w = weights.dequantize()
    x = torch.randn(m, k, generator=g)
    x[0, 70] = 3e4  # an outlier (as in some LLM activation channels), in block 2 of row 0
    x[1, 32:64] = 0  # a zero block
    x[1, 544:] = 0  # a zero block in the short last chunk
    x[2] = 0  # a zero row: y is the bias
    x[3, :32] = 1e-35  # a block below the kernel's 1e-30 floor: dropped, not divided by
    x = x.to(dtype)
    bias = torch.randn(n, generator=g)
    with kernel_activations(nk, "vnni"):
        y = nk.int4_linear(x, packed, sz, bias)
    assert torch.isfinite(y).all()
    exact = F.linear(x.float(), w, bias)
    assert rel_err(y, F.linear(int8_activations(x.float()), w, bias)) < tol(dtype)
    assert int4_close(y, exact, x.float(), w, "vnni")
    assert torch.equal(y[2].float(), bias.to(dtype).float())


def test_the_build_is_shared_by_every_checkout(nk) -> None:
    """The build compiles a copy of kernels.cpp inside its content-keyed folder, so the build rules name no
    checkout's path and a second checkout (or a wheel install) finds the build ready instead of redoing it."""
    directory = native.build_dir()
    assert native.is_built()
    for name in ("kernels.cpp", "int4_lanes.h"):  # the source and the header it includes
        assert (directory / name).read_bytes() == (Path(native.__file__).parent / name).read_bytes()
    rules = (directory / "build.ninja").read_text()
    assert f"compile {directory / 'kernels.cpp'}" in rules
    assert str(Path(native.__file__).parent) not in rules


def test_vnni_env_switch(nk) -> None:
    """GLMSTACK_VNNI=0 (applied by glmstack.load) puts the int8/int4 kernels on the fp32 path; set_vnni can't
    turn VNNI on without it."""
    code = ("import glmstack; from glmstack.engine import native; glmstack.load(); "
            "print(native.kernels().activation_path())")
    env = {**os.environ, "GLMSTACK_VNNI": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fp32"
    with kernel_activations(nk, "fp32"):
        assert nk.activation_path() == "fp32"
        nk.set_vnni(True)
        assert nk.activation_path() == ("vnni" if nk.vnni_supported() else "fp32")


@pytest.mark.parametrize("fuse", ["norm", "silu_mul", "residual", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,path", [(8, "fp32"), (8, "vnni"), (4, "fp32"), (4, "vnni")])
def test_fused_input_transforms_and_residual(nk, fuse, dtype, bits, path) -> None:
    with kernel_activations(nk, path):
        check_fused_input_transforms(nk, fuse, dtype, bits, path)


def check_fused_input_transforms(nk, fuse: str, dtype: torch.dtype, bits: int, activation_path: str) -> None:
    g = torch.Generator().manual_seed(7)
    m, k, n = 3, 96, 48
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g))
        linear.bias.copy_(torch.randn(n, generator=g))
    module = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size=32)
    w_ref = module.weight.float() * module.weight_scale.float()[:, None] if bits == 8 else \
        quantize_int4(linear.weight.detach(), 32, torch.bfloat16).dequantize()
    norm = RMSNorm(k, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
    silu_mul = fuse in ("silu_mul", "all")
    x = torch.randn(m, 2 * k if silu_mul else k, generator=g).to(dtype)
    residual = torch.randn(m, n, generator=g).to(dtype) if fuse in ("residual", "all") else None
    use_norm = fuse in ("norm", "all")
    y = module.native_forward(x, norm=norm if use_norm else None, silu_mul=silu_mul, residual=residual)
    assert y is not None
    x_in = ref_input(x, norm.weight.detach() if use_norm else None, silu_mul, 1e-5)
    ref = F.linear(x_in, w_ref, linear.bias.detach())
    if residual is not None:
        ref = ref + residual.float()
    assert y.dtype == dtype
    if activation_path == "fp32":
        assert rel_err(y, ref) < tol(dtype) * 2
    else:  # x^ from the kernel's own transform of x, so the bound rather than x^ of ours (a tie may round apart)
        assert int4_close(y, ref, x_in, w_ref, activation_path)


def test_bad_shapes_raise(nk) -> None:
    q, scale = quantize_int8(torch.randn(8, 32), torch.bfloat16)
    with pytest.raises(RuntimeError, match="columns"):
        nk.int8_linear(torch.randn(1, 31), q, scale)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        nk.int8_linear(torch.randn(1, 32).half(), q, scale)


# ---- the modules: native path, fallback path ---------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 40, 100])  # decode sizes take the native kernel, prompts the GEMM
def test_modules_agree_with_and_without_native(bits, rows) -> None:
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(192, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 192, generator=g))
    module = Int8Linear.from_linear(linear) if bits == 8 else Int4Linear.from_linear(linear, group_size=32)
    w_ref = module.weight.float() * module.weight_scale.float()[:, None] if bits == 8 else \
        quantize_int4(linear.weight.detach(), 32, torch.bfloat16).dequantize()
    x = torch.randn(rows, 192, generator=g)
    ref = F.linear(x, w_ref, linear.bias.detach())
    fast = module(x)
    previous = native.set_enabled(False)
    try:
        fallback = module(x)  # int4 weights in the native layout: dequantized, then a bf16 GEMM
    finally:
        native.set_enabled(previous)
    native_rows = NATIVE_MAX_ROWS if bits == 8 else INT4_NATIVE_MAX_ROWS
    if native.kernels().activation_path() == "vnni":  # type: ignore[union-attr]  # every row count
        assert int4_close(fast, ref, x, w_ref, "vnni")
    elif rows > native_rows:
        assert rel_err(fast, ref) < 1e-2  # a bf16 GEMM
    else:
        assert rel_err(fast, ref) < 1e-5
    assert rel_err(fallback, ref) < 1e-2


def test_int4_packs_for_aten_when_native_is_off(aten_only) -> None:
    linear = nn.Linear(64, 32)
    module = Int4Linear.from_linear(linear, group_size=32)
    assert module.packed_for == "cpu"  # ATen's tinygemm layout, as before the native kernels
    x = torch.randn(2, 64)
    ref = F.linear(x, quantize_int4(linear.weight.detach(), 32, torch.bfloat16).dequantize(), linear.bias.detach())
    assert rel_err(module(x), ref) < 1e-2


# ---- paged attention against F.scaled_dot_product_attention -----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_paged_attention_matches_sdpa(nk, dtype, heads, kv_heads) -> None:
    g = torch.Generator().manual_seed(heads)
    # lengths around the kernel's blocks of 16 positions
    d, slots_total, lengths = 32, 128, [5, 1, 17, 16, 40]
    b = len(lengths)
    keys = torch.randn(slots_total, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(slots_total, kv_heads, d, generator=g).to(dtype)
    perm = torch.randperm(slots_total, generator=g).tolist()
    starts = [sum(lengths[:i]) for i in range(b)]
    contexts = [perm[start : start + n] for start, n in zip(starts, lengths, strict=True)]  # new token's slot last
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    pos = torch.tensor([n - 1 for n in lengths], dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    # reference on copies, in fp32
    ref_k, ref_v = keys.float().clone(), values.float().clone()
    q, k, v = qkv.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)

    def rot(t: torch.Tensor, h: int) -> torch.Tensor:
        t = t.view(b, h, d)
        rotated = torch.cat((-t[..., d // 2 :], t[..., : d // 2]), dim=-1)
        return t * cos.float()[:, None] + rotated * sin.float()[:, None]

    q, k = rot(q, heads), rot(k, kv_heads).to(dtype).float()  # the cache holds k in its dtype
    v = v.view(b, kv_heads, d).to(dtype).float()
    refs = []
    for i, ctx in enumerate(contexts):
        ref_k[ctx[-1]], ref_v[ctx[-1]] = k[i], v[i]
        kk, vv = ref_k[ctx].transpose(0, 1)[None], ref_v[ctx].transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(q[i][None, :, None], kk, vv, enable_gqa=heads != kv_heads)
        refs.append(out.reshape(-1))
    longest = max(lengths)
    gather = torch.tensor([c + [0] * (longest - len(c)) for c in contexts])
    slots = torch.tensor([c[-1] for c in contexts])
    out = nk.paged_attention(qkv, cos, sin, keys, values, slots, gather, torch.tensor(lengths), heads,
                              kv_heads, 1 / math.sqrt(d))
    assert out.dtype == dtype and rel_err(out, torch.stack(refs)) < tol(dtype)
    for i, ctx in enumerate(contexts):  # k/v written into their slots
        assert rel_err(keys[ctx[-1]], k[i]) < tol(dtype) and torch.equal(values[ctx[-1]].float(), v[i])


def test_paged_attention_checks_slots(nk) -> None:
    keys = torch.zeros(8, 1, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        nk.paged_attention(torch.zeros(1, 48), torch.ones(1, 16), torch.zeros(1, 16), keys, keys.clone(),
                            torch.tensor([9]), torch.tensor([[0]]), torch.tensor([1]), 1, 1, 0.25)


# ---- end to end: a tiny random Llama, quantized, decoding through the paged runner --------------------------


def tiny_model(bits: int, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6,
                      num_kv_heads=2, head_dim=16, qkv_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0).add_(torch.rand_like(p) * 0.2)
    model.to(dtype)
    quantize_model(model, bits, quantize_embedding=False)  # these tests compare the linears' paths
    return model


def decode_logits(model: LlamaForCausalLM, prompts: list[list[int]], steps: int,
                  forced: list[list[int]] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill each prompt, then decode all of them together for `steps` tokens (greedy, or the `forced`
    tokens when given). Returns the decode logits [steps, B, V] and the tokens."""
    dtype = next(model.parameters()).dtype
    cfg = model.config
    kv = PagedKVCache(cfg.num_layers, 32, 8, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=torch.device("cpu"))
    runner = ModelRunner(model, kv, torch.device("cpu"))
    seqs = [Sequence(f"s{i}", list(p), 64, block_table=list(range(i * 8, i * 8 + 8))) for i, p in enumerate(prompts)]
    first = runner.execute(StepPlan([ScheduledChunk(s, 0, s.num_tokens) for s in seqs]))
    tokens = [[int(first[i].argmax())] if forced is None else [forced[i][0]] for i in range(len(seqs))]
    for s, t in zip(seqs, tokens, strict=True):
        s.output_ids.append(t[0])
    logits = []
    for step in range(steps):
        out = runner.execute(StepPlan([ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs]))
        logits.append(out.float())
        for i, s in enumerate(seqs):
            t = int(out[i].argmax()) if forced is None else forced[i][step + 1]
            s.output_ids.append(t)
            tokens[i].append(t)
    return torch.stack(logits), tokens


def dequantized_copy(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same quantized weights as plain fp32 `nn.Linear`s: the exact answer both paths approximate."""
    ref = copy.deepcopy(model).float()
    ref.__dict__.pop("_native_plan_cache", None)  # the copy must not run the quantized model's native plan
    for name, m in list(ref.named_modules()):
        if isinstance(m, Int8Linear):
            w = m.row_weight().float() * m.weight_scale.float()[:, None]
        elif isinstance(m, Int4Linear):
            assert m.packed_for == "cpu-native"
            n, k, g = m.out_features, m.in_features, m.group_size
            packed, sz = m.row_layout()
            b = packed.view(n, k // 32, 1, 16)
            codes = torch.cat((b & 15, b >> 4), dim=2).view(n, k // g, g).float()
            scale, zero = sz.float().unbind(1)
            w = ((codes - 8) * scale[..., None] + zero[..., None]).view(n, k)
        else:
            continue
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if m.bias is not None:
                linear.bias.copy_(m.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, linear)
    return ref


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_end_to_end_decode_matches_reference_and_aten_path(nk, bits, dtype) -> None:
    model = tiny_model(bits, dtype)
    prompts = [[5, 17, 42, 99, 7], [250, 3, 3, 8, 12, 1, 77, 64, 9, 10, 11]]  # the second spans two blocks
    fast_logits, tokens = decode_logits(model, prompts, 12)  # greedy, native
    ref_logits, _ = decode_logits(dequantized_copy(model), prompts, 12, forced=tokens)  # fp32, teacher-forced
    native.set_enabled(False)
    try:
        aten_logits, _ = decode_logits(model, prompts, 12, forced=tokens)
    finally:
        native.set_enabled(True)
    fast_err, aten_err = rel_err(fast_logits, ref_logits), rel_err(aten_logits, ref_logits)
    # ATen's kernels compute in bf16 whatever the model dtype; ours in fp32 (bf16 models: bf16 between ops)
    assert aten_err < 0.1
    if dtype == torch.float32 and bits == 8 and nk.activation_path() == "fp32":
        assert fast_err < 1e-4
    elif dtype == torch.float32:  # int8 activations (VNNI), or int4's prompt as a bf16 GEMM: ~6% here
        assert fast_err < 0.08
    else:
        assert fast_err < 0.1
    # the greedy tokens are the reference's wherever its top two are not a near-tie: further apart than 3x
    # the typical logit error (int8 activations: ~5% of the logits' spread), 5x in bf16, whose rounding
    # between every op has longer tails against the fp32 reference
    top2 = ref_logits.topk(2, dim=-1).values
    margin = 3 if dtype == torch.float32 else 5
    clear = (top2[..., 0] - top2[..., 1]) > max(0.1, margin * fast_err * ref_logits.std().item())
    assert bool((fast_logits.argmax(-1) == ref_logits.argmax(-1))[clear].all())
    assert clear.float().mean() >= 0.4  # the comparison is not vacuous


@pytest.mark.parametrize("path", ["fp32", "vnni"])
def test_fused_path_is_taken(nk, monkeypatch, path) -> None:
    """The whole-layer native path runs every paged step, prompt or decode; on fp32 activations a prompt
    longer than the GEMV's rows goes to the modules (dequantize + GEMM)."""
    import glmstack.engine.models.llama as llama

    calls: list[bool] = []
    real = llama.fused_llama_layers

    def spy(*args):  # type: ignore[no-untyped-def]
        result = real(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(llama, "fused_llama_layers", spy)
    with kernel_activations(nk, path):
        decode_logits(tiny_model(8, torch.float32), [[1, 2, 3]], 2)
        assert calls == [True, True, True]
        calls.clear()
        decode_logits(tiny_model(8, torch.float32), [list(range(1, 41))], 1)
        assert calls == [path == "vnni", True]


@pytest.mark.parametrize("group", [32, 64])
def test_int4_dequantize_matches_reference(nk, group) -> None:
    weights = quantize_int4(torch.randn(20, 192, generator=torch.Generator().manual_seed(group)), group,
                            torch.bfloat16)
    packed, sz = pack_int4_native(weights, torch.bfloat16)
    w = nk.int4_dequantize(packed, sz)
    assert w.dtype == torch.bfloat16 and torch.equal(w, weights.dequantize().bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_rows_attend_like_sdpa_and_bit_for_bit_like_decoding_rows(nk, dtype) -> None:
    """A prompt chunk's rows (one gather row, consecutive lengths: the tiled path) match causal SDPA over the
    sequence, and each row's output is the very bits of the same token attended alone, as a decoding row."""
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, d, past, chunk = 6, 2, 32, 37, 11  # the chunk starts mid-block and ends in the next
    total = past + chunk
    keys = torch.randn(96, kv_heads, d, generator=g).to(dtype)
    values = torch.randn(96, kv_heads, d, generator=g).to(dtype)
    context = torch.randperm(96, generator=g)[:total]
    qkv = torch.randn(chunk, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    cos = torch.randn(chunk, d, generator=g).to(dtype)
    sin = torch.randn(chunk, d, generator=g).to(dtype)
    slots = context[past:].contiguous()
    lengths = torch.arange(past + 1, total + 1)
    out = nk.paged_attention(qkv, cos, sin, keys, values, slots, context[None].contiguous(), lengths, heads,
                              kv_heads, 1 / math.sqrt(d), torch.zeros(chunk, dtype=torch.long))
    # each row alone, after the chunk wrote its keys: the row path
    for i in range(chunk):
        alone = nk.paged_attention(qkv[i : i + 1].contiguous(), cos[i : i + 1].contiguous(),
                                    sin[i : i + 1].contiguous(), keys, values, slots[i : i + 1].contiguous(),
                                    context[None, : past + i + 1].contiguous(), lengths[i : i + 1].contiguous(),
                                    heads, kv_heads, 1 / math.sqrt(d))
        assert torch.equal(alone[0], out[i]), i
    # against SDPA: q rotated as the kernel does, keys and values as the cache now holds them
    q = qkv.float()[:, : heads * d].view(chunk, heads, d)
    rotated = torch.cat((-q[..., d // 2 :], q[..., : d // 2]), dim=-1)
    q = q * cos.float()[:, None] + rotated * sin.float()[:, None]
    k = keys[context].float().transpose(0, 1)[None]  # [1, Hkv, total, d]
    v = values[context].float().transpose(0, 1)[None]
    mask = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask, enable_gqa=True)
    assert rel_err(out, ref[0].transpose(0, 1).reshape(chunk, -1)) < tol(dtype)
