"""Weights that arrive already quantized (GGUF block types, ChatGLM `quantization_bit: 4`) in the engine's
native forms, `Int4Weights` and `Int8Weights`: exactly where the file's grid is one the kernels hold, by
requantizing otherwise."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from glmstack.engine.loading.gguf_file import dequantize_raw, k_scale_min, q4_k_codes
from glmstack.engine.quant.int4 import Int4Weights, quantize_int4
from glmstack.engine.quant.int8 import Int8Weights, quantize_int8

Q = GGMLQuantizationType

# Which native form each GGUF block type becomes: 4 -> Int4Weights (group 32), 8 -> Int8Weights (per row).
# Q4_0, Q4_1 and Q4_K convert exactly; the others are dequantized and requantized, a row chunk at a time.
GGUF_NATIVE_BITS: dict[GGMLQuantizationType, int] = {
    Q.Q4_0: 4, Q.Q4_1: 4, Q.Q4_K: 4,
    Q.IQ4_NL: 4, Q.Q2_K: 4, Q.Q3_K: 4,
    Q.Q5_0: 8, Q.Q5_1: 8, Q.Q5_K: 8, Q.Q6_K: 8, Q.Q8_0: 8,
}
GGUF_EXACT_INT4 = (Q.Q4_0, Q.Q4_1, Q.Q4_K)

INT4_GROUP = 32  # the GGUF sub-block size: K-quants' scales and Q4/IQ4_NL blocks are per 32 weights
# Weights dequantized per requantization pass: a bounded float32 temporary (4 MB) that stays in cache;
# measured 2-3x faster than passes of linear_base.row_slices' 16M on 4096x4096.
REQUANT_CHUNK = 1 << 20
# Least-squares refits per int4 group. Measured on IQ4_NL: 0 -> 0.083 relative RMS conversion error, 1 -> 0.071,
# 2 -> 0.068, 4 -> 0.067; a search over 8 starting scales (llama.cpp's make_qkx2 style) reaches 0.061 at ~7x
# the time of min/max.
REFIT_ITERATIONS = 2


def native_weights_from_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, int],
                             scale_dtype: torch.dtype = torch.bfloat16,
                             bits: int | None = None) -> Int4Weights | Int8Weights:
    """A GGUF tensor's blocks (`GGUFFile.raw`, read-only is fine; shape [N, K] in PyTorch order) in the
    native form `GGUF_NATIVE_BITS` names. Raises ValueError for any other type (F16/BF16/F32, IQ2/IQ3, ...).

    Exact (float32 scales, whatever `scale_dtype`; the kernel's packing rounds them): Q4_0, Q4_1 (see
    `int4_weights_from_gguf`) and Q4_K, whose 32-weight sub-blocks are `d·sc·q - dmin·m` with q in 0..15:
    scale d·sc, zero 8·d·sc - dmin·m. Requantized from gguf's own dequantization (row chunks of
    `REQUANT_CHUNK` weights, never the whole tensor in float32), scales rounded to `scale_dtype` before the
    codes are chosen: IQ4_NL, Q2_K, Q3_K -> group-32 int4 (min/max, then `REFIT_ITERATIONS` least-squares
    refits, each group keeping its lowest-error fit); Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 -> per-row int8
    (`quantize_int8`).

    Measured (benchmarks/bench_gguf_native.py): a 1024x4096 N(0, 1) matrix quantized to each type by ggml's
    reference quantizers (llama.cpp's libggml, no imatrix), then converted with bf16 scales. Relative RMS
    errors: "type" = the GGUF type vs the fp32 source, "conv" = our weights vs gguf's dequantization,
    "total" = our weights vs the fp32 source.

        type    -> form  type    conv    total   (conv with plain min/max int4)
        Q4_0    -> int4  0.0860  exact   0.0860
        Q4_1    -> int4  0.0783  exact   0.0783
        Q4_K    -> int4  0.0714  exact   0.0714
        IQ4_NL  -> int4  0.0761  0.0674  0.1017  (0.0831)
        Q2_K    -> int4  0.2965  0.0544  0.3010  (0.0644)
        Q3_K    -> int4  0.1508  0.0682  0.1659  (0.0812)
        Q5_0    -> int8  0.0427  0.0084  0.0435
        Q5_1    -> int8  0.0378  0.0087  0.0388
        Q5_K    -> int8  0.0361  0.0087  0.0371
        Q6_K    -> int8  0.0177  0.0086  0.0197
        Q8_0    -> int8  0.0054  0.0087  0.0102
        Q5_0    -> int4  0.0427  0.0704  0.0825  (bits=4: a 5-bit fallback tensor in a 4-bit file)
        Q5_1    -> int4  0.0378  0.0658  0.0758
        Q5_K    -> int4  0.0361  0.0658  0.0753

    (For scale: from the fp32 source, int4 group 32 min/max is 0.0783 and per-row int8 0.0087.) Int8's step
    is max|row|/127: noise next to Q5's own error, but it doubles Q8_0's. IQ4_NL's non-uniform grid costs
    int4 a third of the error on top of the file's. Time on 4096x4096 (2 threads, shared box): exact int4
    10-30 ms, int8 20-50 ms, requantized int4 150-250 ms (the refits double min/max's time).

    `bits` asks for the other form of a requantized type (int4 for a 5-bit tensor inside a 4-bit preset).
    """
    if qtype in GGUF_NATIVE_BITS and qtype not in GGUF_EXACT_INT4 and bits in (4, 8):
        pass  # a requantized type: either form
    else:
        bits = GGUF_NATIVE_BITS.get(qtype)
    if bits is None:
        native = ", ".join(t.name for t in GGUF_NATIVE_BITS)
        raise ValueError(f"GGUF {qtype.name} tensors have no native int4/int8 form (those do: {native})")
    if qtype in GGUF_EXACT_INT4:
        return int4_weights_from_gguf(raw, qtype, shape)
    n, k = shape
    by_row = np.asarray(raw).reshape(n, -1)
    step = max(1, REQUANT_CHUNK // k)
    chunks = [slice(start, min(n, start + step)) for start in range(0, n, step)]
    if bits == 8:
        q = torch.empty(n, k, dtype=torch.int8)
        scale = torch.empty(n, dtype=scale_dtype)
        for rows in chunks:
            w = dequantize_raw(by_row[rows], qtype, (rows.stop - rows.start, k))
            q[rows], scale[rows] = quantize_int8(w, scale_dtype)
        return Int8Weights(q, scale)
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // INT4_GROUP)
    zeros = torch.empty_like(scales)
    for rows in chunks:
        w = dequantize_raw(by_row[rows], qtype, (rows.stop - rows.start, k))
        part = refit_int4(w, quantize_int4(w, INT4_GROUP, scale_dtype), scale_dtype)
        codes[rows], scales[rows], zeros[rows] = part.codes, part.scales, part.zeros
    return Int4Weights(codes, scales, zeros, INT4_GROUP)


def refit_int4(weight: torch.Tensor, start: Int4Weights, scale_dtype: torch.dtype,
               iterations: int = REFIT_ITERATIONS) -> Int4Weights:
    """Lower `start`'s squared error to `weight` group by group: fit scale and zero by least squares to the
    chosen codes, round them to `scale_dtype`, choose the codes again; a group keeps a refit only where it
    is better, so no group ends worse than `start`. Min/max (`quantize_int4`) reproduces a group's extremes
    at the price of a coarse step; a GGUF grid that is not uniform (IQ4_NL) or is two 16-weight grids
    (Q2_K, Q3_K) fits a finer step better: 16-19% lower RMS error on ggml-quantized Gaussian weights."""
    n, k = weight.shape
    g = start.group_size
    w = weight.float().view(n, k // g, g)
    s, z = start.scales.clone(), start.zeros.clone()
    c = start.codes.view(n, k // g, g).float() - 8
    err = _group_sse(w, c, s, z)
    sum_w = w.sum(-1)
    for _ in range(iterations):
        # least squares of w ≈ c·s + z over the group's 32 (c, w) pairs
        sum_c, sum_cc, sum_cw = c.sum(-1), c.square().sum(-1), (c * w).sum(-1)
        det = g * sum_cc - sum_c * sum_c
        fit_s = (g * sum_cw - sum_c * sum_w) / det
        fit_z = (sum_w - fit_s * sum_c) / g
        ok = (det > 0) & (fit_s > 0)  # a group of one code (det 0) keeps its fit
        fit_s = torch.where(ok, fit_s, s).to(scale_dtype).float()
        fit_z = torch.where(ok, fit_z, z).to(scale_dtype).float()
        fit_c = torch.sub(w, fit_z[..., None]).div_(fit_s[..., None]).round_().clamp_(-8, 7)
        fit_err = _group_sse(w, fit_c, fit_s, fit_z)
        better = fit_err < err
        s, z, err = torch.where(better, fit_s, s), torch.where(better, fit_z, z), torch.where(better, fit_err, err)
        c = torch.where(better[..., None], fit_c, c)
    return Int4Weights((c + 8).to(torch.uint8).view(n, k), s, z, g)


def _group_sse(w: torch.Tensor, c: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (c * s[..., None] + z[..., None] - w).square_().sum(-1)


def int4_weights_from_gguf(raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType,
                           shape: tuple[int, int]) -> Int4Weights:
    """GGUF Q4_0 / Q4_1 blocks (32 weights each) and Q4_K super-blocks (8 sub-blocks of 32) as group-32
    `Int4Weights`, without going through floats.

    All map exactly onto the kernel's `(q - 8)·scale + zero`: Q4_0 is `d·(q - 8)` → scale d, zero 0;
    Q4_1 is `d·q + m` → scale d, zero m + 8d; Q4_K is `d·sc·q - dmin·m` → scale d·sc, zero
    8·d·sc - dmin·m. With float32 scales the result equals GGUF's own dequantization bit for bit for Q4_0
    and Q4_1, and to float32 rounding of the zero for Q4_K; bf16 scales (the fast CPU path) round scale
    and zero to 8 mantissa bits."""
    # np.array copies: the GGUF map is read-only and torch wants writable memory
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, dtype=np.uint8))
    n, k = shape
    if qtype == Q.Q4_K:
        return _int4_weights_from_q4_k(data, n, k)
    if qtype == Q.Q4_0:
        blocks = data.view(-1, 18)  # f16 d, 16 bytes of nibbles
        d, nibbles = blocks[:, :2].contiguous().view(torch.float16).float(), blocks[:, 2:]
        zero = torch.zeros_like(d)
    elif qtype == Q.Q4_1:
        blocks = data.view(-1, 20)  # f16 d, f16 m, 16 bytes of nibbles
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        nibbles, zero = blocks[:, 4:], m + 8 * d
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit block type this converts exactly (Q4_0, Q4_1, Q4_K)")
    codes = torch.cat((nibbles & 15, nibbles >> 4), dim=-1)  # ggml: element j low nibble, j + 16 high
    return Int4Weights(codes.reshape(n, k), d.view(n, k // 32), zero.view(n, k // 32), 32)


def _int4_weights_from_q4_k(data: torch.Tensor, n: int, k: int) -> Int4Weights:
    # 144 bytes per 256 weights: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 of nibbles
    blocks = data.view(-1, 144)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).float()
    sc, m = k_scale_min(blocks[:, 4:16])
    scale = d * sc.float()  # exact in float32: an 11-bit significand times a 6-bit integer
    zero = 8 * scale - dmin * m.float()  # the one rounding: w = (q - 8)·scale + zero = scale·q - dmin·m
    codes = q4_k_codes(blocks[:, 16:])  # [blocks, 8, 32] in weight order
    return Int4Weights(codes.reshape(n, k), scale.view(n, k // 32), zero.view(n, k // 32), 32)


def int4_weights_from_chatglm(weight: torch.Tensor, weight_scale: torch.Tensor,
                              group_size: int = 128) -> Int4Weights:
    """A ChatGLM `quantization_bit: 4` checkpoint linear (spec 7.2: int8 [out, in/2], even element in the
    high nibble, symmetric values -7..7, one scale per row) as `Int4Weights`, exactly: code = q + 8, the
    row's scale repeated for every group, zero 0."""
    w = weight.to(torch.int8)
    hi, lo = w >> 4, (w << 4) >> 4  # arithmetic shifts sign-extend the nibbles
    q = torch.stack((hi, lo), dim=-1).view(w.shape[0], -1)
    groups = q.shape[1] // group_size
    scales = weight_scale.float()[:, None].expand(-1, groups).contiguous()
    return Int4Weights((q + 8).to(torch.uint8), scales, torch.zeros_like(scales), group_size)
