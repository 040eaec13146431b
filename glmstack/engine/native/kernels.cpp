// Native CPU kernels for glmstack's quantized linears and paged attention (AVX-512; built by
// glmstack/engine/native/__init__.py).
//
// - int8_linear: y = (x @ w.T) * scale (+ bias) (+ residual); w int8 [N, K], one scale per row.
// - int4_linear: the same for group-wise asymmetric int4, w = (q - 8) * s + z per group of G inputs, codes
//   packed 16 bytes per 32 inputs: byte j holds input j (low nibble) and input j + 16 (high nibble).
// Where the CPU has AVX512-VNNI (checked at run time) both quantize x to int8 per block of 32 inputs, once per
// call, and sum weights x activations in int32 with VPDPBUSD (llama.cpp's Q4 x Q8 and Q8 x Q8 dots; int4's
// kernel, one output per lane, is int4_lanes.h); that reads the weights at memory speed in decode and runs a
// prompt's rows at GEMM speed. A row's result is
// bit-identical whatever else the call holds (1 row or 500), so a token's logits do not depend on how a
// serving step was composed. Elsewhere, or after set_vnni(false), they multiply fp32 activations.
// Both take an optional input transform, fused so decode makes one call instead of three:
//   norm_weight: x <- rms_norm(x) * norm_weight (the layer's RMSNorm before the projection)
//   silu_mul:    x is [M, 2K] = [gate | up], x <- silu(gate) * up (the MLP's activation before down_proj)
// - paged_attention: rotary on q/k, KV-cache write, and each row's attention over its sequence's paged
//   context, for decoding rows (one token of a sequence) and prompt rows (a chunk's tokens, each seeing the
//   ones before it) alike, with the same arithmetic per row: a token attends the same bits either way.
//   Rotary is Llama's rotate-half over the whole head, or GLM's adjacent pairs over the head's first dims.
// - rms_norm_add: residual + rms_norm(x) * weight, for GLM-4-0414's norms on a sublayer's output.
// Accumulation is fp32 (int32 within a 128-input chunk, or a 32-input block for int4, on VNNI). Threads come
// from ATen's pool.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int MR = 4;  // activation rows per micro-kernel tile
constexpr int NR = 4;  // weight rows per micro-kernel tile

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float load_scalar(const void* base, int64_t i, bool bf16) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// ---- activations -> fp32 ---------------------------------------------------------------------------------

// Row m of x as fp32 into dst (K floats), applying silu_mul / rms_norm when asked.
void prepare_row(const at::Tensor& x, int64_t m, int64_t K, bool silu_mul, const void* norm_w, bool norm_bf16,
                 float eps, float* dst) {
  const int64_t width = silu_mul ? 2 * K : K;
  if (x.scalar_type() == at::kFloat) {
    const float* src = x.data_ptr<float>() + m * width;
    if (silu_mul) {
      for (int64_t k = 0; k < K; ++k) {
        float g = src[k];
        dst[k] = g / (1.0f + std::exp(-g)) * src[K + k];
      }
    } else {
      std::memcpy(dst, src, K * sizeof(float));
    }
  } else {  // bf16
    const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * width;
    if (silu_mul) {
      for (int64_t k = 0; k < K; ++k) {
        float g = bf16_to_float(src[k]);
        dst[k] = g / (1.0f + std::exp(-g)) * bf16_to_float(src[K + k]);
      }
    } else {
      for (int64_t k = 0; k < K; ++k) dst[k] = bf16_to_float(src[k]);
    }
  }
  if (norm_w != nullptr) {
    double ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(dst[k]) * dst[k];
    const float r = 1.0f / std::sqrt(static_cast<float>(ss / K) + eps);
    for (int64_t k = 0; k < K; ++k) dst[k] = dst[k] * r * load_scalar(norm_w, k, norm_bf16);
  }
}

struct Prepared {
  at::Tensor xf;  // fp32 [M, K]
};

const void* optional_ptr(const std::optional<at::Tensor>& t, bool& bf16, int64_t numel, const char* what);

at::Tensor prepare(const at::Tensor& x, int64_t K, bool silu_mul, const std::optional<at::Tensor>& norm_weight,
                   double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(x.size(1) == (silu_mul ? 2 * K : K), "x has ", x.size(1), " columns, the weight takes ", K);
  const int64_t M = x.size(0);
  if (x.scalar_type() == at::kFloat && !silu_mul && !norm_weight.has_value()) return x;
  // The norm's weight is read as it is, fp32 or bf16: converting a bf16 model's weight on every call cost an
  // ATen op per projection. Other dtypes are converted.
  std::optional<at::Tensor> nw = norm_weight;
  const bool as_is = nw.has_value() && nw->is_contiguous() &&
                     (nw->scalar_type() == at::kFloat || nw->scalar_type() == at::kBFloat16);
  if (nw.has_value() && !as_is) nw = nw->to(at::kFloat).contiguous();
  bool norm_bf16 = false;
  const void* w = optional_ptr(nw, norm_bf16, K, "norm weight");
  at::Tensor xf = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* out = xf.data_ptr<float>();
  // Rows are independent: a prompt's hundreds of them split across threads, each computed as alone.
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      prepare_row(x, m, K, silu_mul, w, norm_bf16, static_cast<float>(eps), out + m * K);
  });
  return xf;
}

// y[m, n] = acc * scale[n] + bias[n] + residual[m, n], written in the output's dtype.
struct Epilogue {
  const void* scale;
  bool scale_bf16;
  const void* bias;
  bool bias_bf16;
  const void* residual;
  bool residual_bf16;
  void* out;
  bool out_bf16;
  int64_t N;

  inline void store(int64_t m, int64_t n, float acc) const {
    float v = scale ? acc * load_scalar(scale, n, scale_bf16) : acc;
    if (bias) v += load_scalar(bias, n, bias_bf16);
    if (residual) v += load_scalar(residual, m * N + n, residual_bf16);
    if (out_bf16) {
      static_cast<at::BFloat16*>(out)[m * N + n] = at::BFloat16(v);
    } else {
      static_cast<float*>(out)[m * N + n] = v;
    }
  }
};

const void* optional_ptr(const std::optional<at::Tensor>& t, bool& bf16, int64_t numel, const char* what) {
  bf16 = false;
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->numel() == numel, what, " must be contiguous with ", numel, " elements");
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16, what, " must be fp32 or bf16");
  bf16 = t->scalar_type() == at::kBFloat16;
  return t->data_ptr();
}

// ---- int8 -------------------------------------------------------------------------------------------------

// How far ahead of the current k the weight rows are prefetched: DRAM latency is hidden only with more
// lines in flight than the hardware prefetcher keeps for these short (K-byte) rows.
constexpr int64_t PREFETCH_BYTES = 2048;

inline __m512 load_w8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load_w8_tail(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// acc[m][r] = x[m0 + m] . w[n0 + r] for MT rows of x and NT rows of w.
template <int MT, int NT>
inline void int8_tile(const float* x, int64_t ldx, const int8_t* w, int64_t K, int64_t m0, int64_t n0,
                      const Epilogue& ep) {
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_setzero_ps();
  const int8_t* wr[NT];
  for (int r = 0; r < NT; ++r) wr[r] = w + (n0 + r) * K;
  const float* xr[MT];
  for (int m = 0; m < MT; ++m) xr[m] = x + (m0 + m) * ldx;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NT];
    if ((k & 63) == 0)
      for (int r = 0; r < NT; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + PREFETCH_BYTES), _MM_HINT_T0);
    for (int r = 0; r < NT; ++r) wv[r] = load_w8(wr[r] + k);
    for (int m = 0; m < MT; ++m) {
      __m512 xv = _mm512_loadu_ps(xr[m] + k);
      for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = tail_mask(K - k);
    __m512 wv[NT];
    for (int r = 0; r < NT; ++r) wv[r] = load_w8_tail(wr[r] + k, mask);
    for (int m = 0; m < MT; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, xr[m] + k);
      for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) ep.store(m0 + m, n0 + r, _mm512_reduce_add_ps(acc[m][r]));
}

// All activation rows against weight rows [n0, n0 + NT).
template <int NT, typename TileFn>
inline void for_m_tiles(int64_t M, TileFn&& tile) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile(std::integral_constant<int, MR>{}, m);
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>{}, m); break;
    case 2: tile(std::integral_constant<int, 2>{}, m); break;
    case 1: tile(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Rows of the weight each parallel task takes: about 64 KiB of weights (less for a short output so both
// threads get work), a multiple of NR.
int64_t grain_rows(int64_t N, int64_t bytes_per_row) {
  int64_t rows = std::max<int64_t>(NR, (64 * 1024) / std::max<int64_t>(bytes_per_row, 1));
  return (rows + NR - 1) / NR * NR;
}

Epilogue make_epilogue(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& residual, at::Tensor& out, int64_t M, int64_t N) {
  Epilogue ep{};
  ep.scale = optional_ptr(scale, ep.scale_bf16, N, "scale");
  ep.bias = optional_ptr(bias, ep.bias_bf16, N, "bias");
  ep.residual = optional_ptr(residual, ep.residual_bf16, M * N, "residual");
  ep.out = out.data_ptr();
  ep.out_bf16 = out.scalar_type() == at::kBFloat16;
  ep.N = N;
  return ep;
}


inline __m512 loadv(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 loadv(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 loadv(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 loadv(const at::BFloat16* p, __mmask16 mask) {
  __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void storev(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void storev(at::BFloat16* p, __m512 v) {  // rounded to nearest even, as static_cast<at::BFloat16>
  __m512i b = _mm512_castps_si512(v);
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}
// ---- int4 -------------------------------------------------------------------------------------------------
//
// Weights: uint8 [N, K/2], 16 bytes per 32 inputs (byte j: input j low nibble, input j + 16 high nibble).
// Scales and zeros: [N, 2, K/G] (a row of scales, then a row of zeros), fp32 or bf16; w = (q - 8) s + z.
// Per group g of a row: y += s_g (q . x)_g + (z_g - 8 s_g) xsum_g, xsum_g = sum of x over the group.
// Two inner loops: vnni_tile (int8 activations, AVX512-VNNI; the default where the CPU has it) and
// int4_tile_fp32 (fp32 activations; elsewhere, or when set_vnni(false) asks for it).

// Nibbles -> fp32, FMA with x, the group's scale applied once per group. (A VDPBF16PS variant, with codes
// turned into bf16 by OR-ing 0x4300 in and x split into two bf16 halves, measured no faster here: the
// loop is bound by the loads and conversions, not by the multiply-adds.)
template <int MT, int NT>
inline void int4_tile_fp32(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w,
                           const void* sz, bool sz_bf16, int64_t m0, int64_t n0, const Epilogue& ep) {
  const int64_t groups = K / G;
  __m512 acc[MT][NT];
  float zacc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_setzero_ps(), zacc[m][r] = 0.f;
  const __m512i low = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 gacc[MT][NT];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < NT; ++r) gacc[m][r] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      __m512 lo[NT], hi[NT];
      for (int r = 0; r < NT; ++r) {
        const uint8_t* p = w + (n0 + r) * (K / 2) + k / 2;
        if ((k & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        lo[r] = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
        hi[r] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
      }
      for (int m = 0; m < MT; ++m) {
        const float* xr = x + (m0 + m) * K + k;
        __m512 xl = _mm512_loadu_ps(xr), xh = _mm512_loadu_ps(xr + 16);
        for (int r = 0; r < NT; ++r)
          gacc[m][r] = _mm512_fmadd_ps(hi[r], xh, _mm512_fmadd_ps(lo[r], xl, gacc[m][r]));
      }
    }
    for (int r = 0; r < NT; ++r) {
      const int64_t row = (n0 + r) * 2 * groups;
      const float s = load_scalar(sz, row + g, sz_bf16), shift = load_scalar(sz, row + groups + g, sz_bf16) - 8.f * s;
      const __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < MT; ++m) {
        acc[m][r] = _mm512_fmadd_ps(gacc[m][r], sv, acc[m][r]);
        zacc[m][r] += shift * xsum[(m0 + m) * groups + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) ep.store(m0 + m, n0 + r, _mm512_reduce_add_ps(acc[m][r]) + zacc[m][r]);
}

// ---- int8 activations x int8 weights (AVX512-VNNI) ---------------------------------------------------------
//
// fp32 activations keep an int8 GEMV compute-bound (a conversion and an FMA per weight). As llama.cpp's Q8 x Q8
// dot does, x is instead quantized to int8 once per call, in blocks of 32 inputs (dx_b = max|x| / 127), and
// VPDPBUSD sums each 4 products into an int32 lane. (int4 weights take the same activations in int4_lanes.h,
// one output per lane.)
//
// Activation layout, per row of x: 128 bytes per 128 inputs (4 blocks): bytes 0..63 hold inputs 0..15 of
// blocks 0..3, bytes 64..127 inputs 16..31 of blocks 0..3. A chunk's two 64-byte weight loads are regrouped by
// 128-bit quarters into the same lo / hi halves, flipped to unsigned (w + 128), and the int32 dot starts from
// -128 x the lane's code sum to remove the offset, so int32 lane l sums inputs of block l / 4 only; each lane
// is scaled by its block's dx and the row's scale comes last: 2 VPDPBUSD per 128 weights where fp32
// activations took 8 FMAs and 8 conversions. A last chunk of 32, 64 or 96 inputs (K = 576 is 4.5 chunks) is a
// masked load against zero-padded activations.
//
// The error this adds is that of rounding each x to within dx_b / 2, as llama.cpp's Q8 activations: the
// result is w . x^ with x^ = dx_b * xq.
//
// A prompt (more than MR rows) regroups each group of NR weight rows once into a per-thread buffer for all
// its row tiles; the arithmetic per output is the decode path's, op for op (vnni_tile).

constexpr int64_t QBLOCK = 32;   // inputs per activation scale
constexpr int64_t QCHUNK = 128;  // inputs per 64-byte weight load

inline int64_t q_chunks(int64_t K) { return (K + QCHUNK - 1) / QCHUNK; }

bool cpu_has_vnni() {
  __builtin_cpu_init();  // may run from a static initializer, before libgcc's own
  return __builtin_cpu_supports("avx512vnni");
}

const bool kCpuHasVnni = cpu_has_vnni();
std::atomic<bool> use_vnni{kCpuHasVnni};  // set_vnni(false) forces the fp32 paths (tests, benchmarks)

// Everything vnni_tile reads besides the weights, built once per call.
struct QuantizedX {
  const int8_t* q;   // [M, chunks * 128] in the layout above, zero past K
  const float* dx;   // [M, chunks * 16]: lane l of chunk c holds dx of block 4c + l / 4 (0 past K)
  // [M, chunks * 16]: -8 x the sum of the 8 codes lane l of chunk c multiplies; x 16 it is the -128 x code
  // sum that takes the weights' +128 offset back out of the int32 dot.
  const int32_t* minus8;
};

// Blocks with max|x| below 1e-30 (all-zero ones among them) get dx = 0 and codes 0: 127 / max|x| stays
// finite, nothing divides 0 by 0, and what is dropped is below 32e-30 |w| per block.
void quantize_row_q8(const float* x, int64_t K, int8_t* q, float* dx, int32_t* minus8) {
  const int64_t chunks = q_chunks(K);
  std::memset(q, 0, chunks * QCHUNK);
  std::fill(dx, dx + chunks * 16, 0.f);
  std::fill(minus8, minus8 + chunks * 16, 0);
  for (int64_t b = 0; b < K / QBLOCK; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * QBLOCK), hi = _mm512_loadu_ps(x + b * QBLOCK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    if (amax < 1e-30f) continue;
    const __m512 inv = _mm512_set1_ps(127.f / amax);
    // round to nearest (MXCSR's default); |x| * 127 / max|x| <= 127 up to rounding, and the pack saturates
    const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    int8_t* dst = q + (b / 4) * QCHUNK + (b % 4) * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtsepi32_epi8(ql));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64), _mm512_cvtsepi32_epi8(qh));
    const float d = amax / 127.f;
    // Lane 4 (b % 4) + i of chunk b / 4 multiplies inputs 4i..4i+3 and 16+4i..16+4i+3 of the block.
    alignas(64) int32_t pairs[16];
    _mm512_store_si512(pairs, _mm512_add_epi32(ql, qh));
    for (int i = 0; i < 4; ++i) {
      const int32_t lane = pairs[4 * i] + pairs[4 * i + 1] + pairs[4 * i + 2] + pairs[4 * i + 3];
      dx[b * 4 + i] = d;
      minus8[b * 4 + i] = -8 * lane;
    }
  }
}

// Quantizes the M rows of x (fp32 [M, K]) into a per-thread buffer that later calls reuse: three tensors
// and three vectors a call cost about 1 us, a tenth of a small decode GEMV. Valid until the next call on
// this thread.
QuantizedX quantize_activations(const float* x, int64_t M, int64_t K) {
  thread_local std::vector<uint64_t> buffer;
  const int64_t chunks = q_chunks(K);
  const int64_t q_bytes = M * chunks * QCHUNK, lanes_bytes = M * chunks * 16 * 4;
  buffer.resize((q_bytes + 2 * lanes_bytes + 64) / 8 + 1);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64);
  int8_t* q = reinterpret_cast<int8_t*>(p);
  float* dx = reinterpret_cast<float*>(p += q_bytes);
  int32_t* minus8 = reinterpret_cast<int32_t*>(p + lanes_bytes);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row_q8(x + m * K, K, q + m * chunks * QCHUNK, dx + m * chunks * 16, minus8 + m * chunks * 16);
  });
  return {q, dx, minus8};
}

inline __m512 load16(const void* p, int64_t i, bool bf16, __mmask16 mask) {
  return bf16 ? loadv(static_cast<const at::BFloat16*>(p) + i, mask) : loadv(static_cast<const float*>(p) + i, mask);
}

// The sums of a, b, c, d in lanes 0, 4, 8, 12: 9 shuffles and adds for four rows, where four
// _mm512_reduce_add_ps take 28 (at K = 576 that was a tenth of the tile's instructions).
inline __m512 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit quarters: [a0+a2, a1+a3, b0+b2, b1+b3] and the same for c, d
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  // quarters: [a, b, c, d], four partial sums each
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  const __m512 u = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));  // + the other pair of the quarter
  return _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));            // + the neighbour
}

// One 128-input chunk of one weight row as VPDPBUSD takes it: unsigned bytes laid out as the activations
// (lo: inputs 0..15 of the chunk's 4 blocks, hi: inputs 16..31).
struct alignas(64) WChunk {
  __m512i lo, hi;
};

// int8 weights are signed: XOR 0x80 makes them w + 128 (unsigned), and the int32 dot starts from
// -128 * (sum of the lane's activation codes) = 16 * minus8 to take the 128 back out, exactly.
__attribute__((target("avx512vnni"))) inline WChunk load_chunk(const uint8_t* w, int64_t K, int64_t n, int64_t c) {
  const int64_t rest = std::min<int64_t>(QCHUNK, K - c * QCHUNK);  // 32, 64, 96 or 128 inputs
  const __mmask64 ma = rest >= 64 ? ~__mmask64{0} : (uint64_t{1} << rest) - 1;
  const __mmask64 mb = rest >= 128 ? ~__mmask64{0} : rest > 64 ? (uint64_t{1} << (rest - 64)) - 1 : 0;
  const uint8_t* p = w + n * K + c * QCHUNK;
  _mm_prefetch(reinterpret_cast<const char*>(p + PREFETCH_BYTES), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 64 + PREFETCH_BYTES), _MM_HINT_T0);
  const __m512i a = _mm512_maskz_loadu_epi8(ma, p), b = _mm512_maskz_loadu_epi8(mb, p + 64);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // 128-bit quarters: lo = [a0, a2, b0, b2] (inputs 0..15 of each block), hi = [a1, a3, b1, b3]
  return {_mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0x88), flip),
          _mm512_xor_si512(_mm512_shuffle_i64x2(a, b, 0xDD), flip)};
}

// acc[m][r] over every chunk, for MT activation rows and NT weight rows. The weights come from `prepared`
// ([chunks][NT], filled by load_chunk) when a tile of rows reuses them, or straight from memory. Both give
// bit-identical results: every (m, r) sees the same operations in the same order, whatever M is and
// whichever rows share its tile - so a row's output never depends on the other rows of the call.
template <int MT, int NT, bool PREPARED>
__attribute__((target("avx512vnni"))) void vnni_tile(const QuantizedX& qx, const uint8_t* w, int64_t K,
                                                     const WChunk* prepared, int64_t m0, int64_t n0,
                                                     const Epilogue& ep) {
  const int64_t chunks = q_chunks(K);
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NT; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    WChunk wc[NT];
    for (int r = 0; r < NT; ++r) wc[r] = PREPARED ? prepared[c * NT + r] : load_chunk(w, K, n0 + r, c);
    for (int m = 0; m < MT; ++m) {
      const int64_t row = (m0 + m) * chunks + c;
      const int8_t* xr = qx.q + row * QCHUNK;
      const __m512i xl = _mm512_loadu_si512(xr), xh = _mm512_loadu_si512(xr + 64);
      const __m512 dv = _mm512_loadu_ps(qx.dx + row * 16);
      const __m512i d0 = _mm512_slli_epi32(_mm512_loadu_si512(qx.minus8 + row * 16), 4);
      for (int r = 0; r < NT; ++r) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(d0, wc[r].lo, xl), wc[r].hi, xh);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), dv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    if constexpr (NT == 4) {
      alignas(64) float sums[16];
      _mm512_store_ps(sums, reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
      for (int r = 0; r < NT; ++r) ep.store(m0 + m, n0 + r, sums[4 * r]);
    } else {
      for (int r = 0; r < NT; ++r) ep.store(m0 + m, n0 + r, _mm512_reduce_add_ps(acc[m][r]));
    }
  }
}

// Every tile of an [M, N] output on the VNNI path, weight rows split across ATen's threads. Up to MR
// activation rows (decode) the weights go straight from memory into the dot; with more, each group of NR
// weight rows is regrouped once into a per-thread buffer and every tile of activation rows reuses it.
void vnni_linear(const QuantizedX& qx, const uint8_t* w, int64_t K, int64_t M, int64_t N, const Epilogue& ep) {
  const int64_t chunks = q_chunks(K);
  at::parallel_for(0, N, grain_rows(N, K), [&](int64_t begin, int64_t end) {
    thread_local std::vector<WChunk> buffer;
    if (M > MR) buffer.resize(chunks * NR);
    auto rows = [&](auto nt, int64_t n0) {
      constexpr int NT = decltype(nt)::value;
      if (M <= MR) {
        for_m_tiles<NT>(M, [&](auto mt, int64_t m0) {
          vnni_tile<decltype(mt)::value, NT, false>(qx, w, K, nullptr, m0, n0, ep);
        });
        return;
      }
      for (int64_t c = 0; c < chunks; ++c)
        for (int r = 0; r < NT; ++r) buffer[c * NT + r] = load_chunk(w, K, n0 + r, c);
      for_m_tiles<NT>(M, [&](auto mt, int64_t m0) {
        vnni_tile<decltype(mt)::value, NT, true>(qx, w, K, buffer.data(), m0, n0, ep);
      });
    };
    int64_t n = begin;
    for (; n + NR <= end; n += NR) rows(std::integral_constant<int, NR>{}, n);
    for (; n < end; ++n) rows(std::integral_constant<int, 1>{}, n);
  });
}

// tile(MT, NT, m0, n0) over every tile of an [M, N] output, the weight rows split across ATen's threads.
template <typename TileFn>
void for_tiles(int64_t M, int64_t N, int64_t bytes_per_row, TileFn&& tile) {
  at::parallel_for(0, N, grain_rows(N, bytes_per_row), [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + NR <= end; n += NR)
      for_m_tiles<NR>(M, [&](auto mt, int64_t m0) { tile(mt, std::integral_constant<int, NR>{}, m0, n); });
    for (; n < end; ++n)
      for_m_tiles<1>(M, [&](auto mt, int64_t m0) { tile(mt, std::integral_constant<int, 1>{}, m0, n); });
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
                       double eps, bool silu_mul, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w must be int8 [N, K]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor xf = prepare(x, K, silu_mul, norm_weight, eps);
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  Epilogue ep = make_epilogue(scale, bias, residual, out, M, N);
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  if (use_vnni.load(std::memory_order_relaxed) && K % QBLOCK == 0) {
    vnni_linear(quantize_activations(xp, M, K), reinterpret_cast<const uint8_t*>(wp), K, M, N, ep);
    return out;
  }
  at::parallel_for(0, N, grain_rows(N, K), [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + NR <= end; n += NR)
      for_m_tiles<NR>(M, [&](auto mt, int64_t m0) { int8_tile<decltype(mt)::value, NR>(xp, K, wp, K, m0, n, ep); });
    for (; n < end; ++n)
      for_m_tiles<1>(M, [&](auto mt, int64_t m0) { int8_tile<decltype(mt)::value, 1>(xp, K, wp, K, m0, n, ep); });
  });
  return out;
}

#include "int4_lanes.h"
#include "int8_lanes.h"

// The group size of int4 weights w ([N, K/2] uint8) with scales_and_zeros sz ([N, 2, K/G]), checked with x.
int64_t int4_group_size(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be uint8 [N, K/2]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == N && sz.size(1) == 2 && sz.size(2) > 0 && sz.is_contiguous(),
              "scales_and_zeros must be [N, 2, K/G]");
  const int64_t G = K / sz.size(2);
  TORCH_CHECK(G % 32 == 0 && K == G * sz.size(2), "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16, "fp32 or bf16 scales");
  return G;
}

// Same arguments as int8_linear; the group size is K / scales_and_zeros.size(-1).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales_and_zeros,
                       const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& norm_weight, double eps, bool silu_mul,
                       const std::optional<at::Tensor>& residual) {
  const at::Tensor& sz = scales_and_zeros;
  const int64_t G = int4_group_size(x, w, sz), N = w.size(0), K = w.size(1) * 2;
  at::Tensor xf = prepare(x, K, silu_mul, norm_weight, eps);
  const int64_t M = xf.size(0), groups = K / G;
  at::Tensor out = at::empty({M, N}, x.options());
  Epilogue ep = make_epilogue(std::nullopt, bias, residual, out, M, N);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const void* szp = sz.data_ptr();
  const bool szb = sz.scalar_type() == at::kBFloat16;
  if (use_vnni.load(std::memory_order_relaxed)) {
    int4_lanes_linear(xf.data_ptr<float>(), M, wp, szp, szb, N, K, G, ep);
    return out;
  }
  const float* xp = xf.data_ptr<float>();
  at::Tensor xs = at::empty({M, groups}, xf.options());
  float* xsp = xs.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xp[m * K + k];
      xsp[m * groups + g] = s;
    }
  for_tiles(M, N, K / 2, [&](auto mt, auto nt, int64_t m0, int64_t n0) {
    int4_tile_fp32<decltype(mt)::value, decltype(nt)::value>(xp, xsp, K, G, wp, szp, szb, m0, n0, ep);
  });
  return out;
}

// Lane layout (int4_lanes.h; made by glmstack/engine/quant/int4.py `int4_to_lanes`): per tile of 16 rows,
// block b, dword j, row r, byte c at ((t * blocks + b) * 4 + j) * 64 + r * 4 + c; scales and zeros as
// [tile][2][group][16 rows]. Back to row layout:
std::tuple<at::Tensor, at::Tensor> int4_from_lanes(const at::Tensor& w, const at::Tensor& sz) {
  const int64_t N = w.size(0), half = w.size(1), groups = sz.size(2);
  TORCH_CHECK(N % OT == 0 && half % 16 == 0, "lane layout needs N % 16 == 0 and K % 32 == 0");
  return {w.view({N / OT, half / 16, 4, OT, 4}).permute({0, 3, 1, 2, 4}).contiguous().view({N, half}),
          sz.view({N / OT, 2, groups, OT}).permute({0, 3, 1, 2}).contiguous().view({N, 2, groups})};
}

// int4_linear for weights in lane layout; without the VNNI path (switched off) they are put back in row
// layout for the call (slow: that path is for comparisons).
at::Tensor int4_linear_lanes(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales_and_zeros,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
                             double eps, bool silu_mul, const std::optional<at::Tensor>& residual) {
  if (!use_vnni.load(std::memory_order_relaxed)) {
    const auto [rows, sz_rows] = int4_from_lanes(w, scales_and_zeros);
    return int4_linear(x, rows, sz_rows, bias, norm_weight, eps, silu_mul, residual);
  }
  const at::Tensor& sz = scales_and_zeros;
  const int64_t G = int4_group_size(x, w, sz), N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(N % OT == 0, "lane layout needs N % 16 == 0");
  at::Tensor xf = prepare(x, K, silu_mul, norm_weight, eps);
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  Epilogue ep = make_epilogue(std::nullopt, bias, residual, out, M, N);
  int4_stored_lanes_linear(xf.data_ptr<float>(), M, w.data_ptr<uint8_t>(), sz.data_ptr(),
                           sz.scalar_type() == at::kBFloat16, N, K, G, ep);
  return out;
}

// int8_linear for weights in lane layout (int8_lanes.h; made by glmstack/engine/quant/int8.py `int8_to_lanes`):
// per tile of 16 rows, block b, dword j, row r, byte c at ((t * blocks + b) * 8 + j) * 64 + r * 4 + c, each byte
// w + 128 (in an int8 tensor). Without the VNNI path (switched off) they are put back in row layout for the call.
at::Tensor int8_linear_lanes(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& norm_weight,
                             double eps, bool silu_mul, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous(), "w must be int8 [N, K] lanes");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "CPU tensors only");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % OT == 0 && K % QBLOCK == 0, "lane layout needs N % 16 == 0 and K % 32 == 0");
  if (!use_vnni.load(std::memory_order_relaxed)) {
    const at::Tensor rows = w.view({N / OT, K / QBLOCK, 8, OT, 4}).permute({0, 3, 1, 2, 4}).contiguous()
                                .view({N, K}).view(at::kByte).bitwise_xor(0x80).view(at::kChar);
    return int8_linear(x, rows, scale, bias, norm_weight, eps, silu_mul, residual);
  }
  at::Tensor xf = prepare(x, K, silu_mul, norm_weight, eps);
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  Epilogue ep = make_epilogue(scale, bias, residual, out, M, N);
  int8_stored_lanes_linear(xf.data_ptr<float>(), M, reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>()), N, K, ep);
  return out;
}

// Turn the VNNI paths of int8_linear and int4_linear on or off (off: fp32 activations); on has no effect on a
// CPU without AVX512-VNNI.
// Returns the previous setting.
bool set_vnni(bool enabled) { return use_vnni.exchange(enabled && kCpuHasVnni); }

// Dequantize int4 rows (the layout above) to bf16 [N, K] for the prompt path's GEMM.
at::Tensor int4_dequantize(const at::Tensor& w, const at::Tensor& sz) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "w must be uint8 [N, K/2]");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(sz.dim() == 3 && sz.size(0) == N && sz.size(1) == 2 && sz.is_contiguous() && K % sz.size(2) == 0 &&
                  (K / sz.size(2)) % 32 == 0, "scales_and_zeros must be [N, 2, K/G], G a multiple of 32");
  TORCH_CHECK(sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16, "fp32 or bf16 scales");
  const int64_t groups = sz.size(2), G = K / groups;
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kBFloat16));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const void* szp = sz.data_ptr();
  const bool szb = sz.scalar_type() == at::kBFloat16;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const __m512i low = _mm512_set1_epi32(15), round = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    auto to_bf16 = [&](__m512 v) {  // round to nearest even
      __m512i b = _mm512_castps_si512(v);
      b = _mm512_add_epi32(b, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
      return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
    };
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; k += 32) {
        const int64_t g = k / G;
        const float sc = load_scalar(szp, n * 2 * groups + g, szb);
        const __m512 s = _mm512_set1_ps(sc);
        const __m512 shift = _mm512_set1_ps(load_scalar(szp, n * 2 * groups + groups + g, szb) - 8.f * sc);
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + n * (K / 2) + k / 2)));
        __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), s, shift);
        __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), s, shift);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + n * K + k), to_bf16(lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + n * K + k + 16), to_bf16(hi));
      }
    }
  });
  return out;
}

// ---- rms_norm_add -----------------------------------------------------------------------------------------

inline void storev(float* p, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(p, mask, v); }
inline void storev(at::BFloat16* p, __m512 v, __mmask16 mask) {  // rounded as the unmasked storev
  __m512i b = _mm512_castps_si512(v);
  b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
}

// out[m] = residual[m] + x[m] / sqrt(mean(x[m]^2) + eps) * w, in fp32, rounded once to T.
template <typename T>
void rms_norm_add_impl(const T* x, const void* w, bool w_bf16, float eps, const T* res, T* out, int64_t M,
                       int64_t K) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* xr = x + m * K;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = loadv(xr + k, tail_mask(std::min<int64_t>(16, K - k)));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(K) + eps));
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = tail_mask(std::min<int64_t>(16, K - k));
        const __m512 normed = _mm512_mul_ps(_mm512_mul_ps(loadv(xr + k, mask), r), load16(w, k, w_bf16, mask));
        storev(out + m * K + k, _mm512_add_ps(loadv(res + m * K + k, mask), normed), mask);
      }
    }
  });
}

// GLM-4-0414's sandwich norms: a sublayer's output x [M, K] is normalized (weight [K], fp32 or bf16) before
// it joins the residual [M, K] (x's dtype, fp32 or bf16), so the linears' fused residual add can't take it.
at::Tensor rms_norm_add(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& residual) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(residual.scalar_type() == dtype && residual.is_contiguous() && residual.sizes() == x.sizes(),
              "residual must be contiguous, with x's shape and dtype");
  const int64_t M = x.size(0), K = x.size(1);
  bool w_bf16 = false;
  const void* w = optional_ptr(weight, w_bf16, K, "weight");
  at::Tensor out = at::empty_like(x);
  if (dtype == at::kFloat) {
    rms_norm_add_impl<float>(x.data_ptr<float>(), w, w_bf16, static_cast<float>(eps), residual.data_ptr<float>(),
                             out.data_ptr<float>(), M, K);
  } else {
    rms_norm_add_impl<at::BFloat16>(x.data_ptr<at::BFloat16>(), w, w_bf16, static_cast<float>(eps),
                                    residual.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), M, K);
  }
  return out;
}

// ---- paged attention --------------------------------------------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// exp of 16 floats: 2^n · p(r) with x = n·ln2 + r, |r| <= ln2/2, a degree-6 polynomial (relative error
// ~2e-7, as std::exp's float rounding); scalef does the 2^n. Attention's probabilities, 16 positions a time.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));  // softmax inputs are <= 0; below this, exp is 0 in float
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact to float
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 poly = _mm512_set1_ps(1.3981999507e-3f);
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(8.3334519073e-3f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(4.1665795894e-2f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.6666665459e-1f));
  poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(5.0000001201e-1f));
  poly = _mm512_fmadd_ps(poly, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(poly, n);
}

// The 16 horizontal sums of v[0..15], as one vector (lane i = sum of v[i]'s lanes): a transpose-and-add
// tree, 15 adds instead of 16 separate reductions.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: v[2i] and v[2i+1] interleaved, pairs summed
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four vectors' partial sums in order
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

// Into L1, every cache line of a row of n elements.
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64) {
    _mm_prefetch(p + offset, _MM_HINT_T0);
  }
}

// Rotate-half rotary of one head (fp32, in place): x[i], x[i + D/2] with cos/sin [D].
template <typename T>
inline void rotate(float* x, const T* cos, const T* sin, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * to_float(cos[i]) - b * to_float(sin[i]);
    x[i + half] = b * to_float(cos[i + half]) + a * to_float(sin[i + half]);
  }
}

// GLM's rotary (ChatGLM2/3, GLM-4; llama.cpp's ROPE_TYPE_NORM) of one head (fp32, in place): the pairs x[2i],
// x[2i + 1] of the first `dims` dims turn by angle i, with cos/sin [dims / 2]; the rest of the head passes
// through. The module path's apply_interleaved_rotary, in fp32.
template <typename T>
inline void rotate_pairs(float* x, const T* cos, const T* sin, int64_t dims) {
  for (int64_t i = 0; i < dims / 2; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], c = to_float(cos[i]), s = to_float(sin[i]);
    x[2 * i] = a * c - b * s;
    x[2 * i + 1] = b * c + a * s;
  }
}

// Softmax numerators of one (row, head)'s scores p[0:L] in place; returns 1 / their sum. Shared by the row and
// tile paths of paged attention, so both give the same bits.
inline float softmax_numerators(float* p, int64_t L) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < L; l += 16) {
    mx = _mm512_mask_max_ps(mx, tail_mask(std::min<int64_t>(16, L - l)), mx, _mm512_loadu_ps(p + l));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; l += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, L - l));
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(p + l), top)));
    _mm512_storeu_ps(p + l, e);
    total = _mm512_add_ps(total, e);
  }
  return 1.f / _mm512_reduce_add_ps(total);
}

// In place: r[i] lane j becomes r[j] lane i (a 16 x 16 fp32 transpose).
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + m], 128-bit lane k: rows 4i..4i+3 of column 4k + m
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int m = 0; m < 4; ++m) {  // column 4k + m: lane k of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512 lo_a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), lo_b = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 hi_a = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE), hi_b = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_f32x4(lo_a, lo_b, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(lo_a, lo_b, 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(hi_a, hi_b, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(hi_a, hi_b, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// acc[0:Dv] += sum over j < m of p[j] · vt[j][0:Dv], j in order (the row path's order), with the
// accumulators in registers: through memory, each step would wait on the last one's store.
template <int VV>
inline void weighted_values_regs(__m512* acc, const float* p, const float* vt, int64_t Dv, int64_t m) {
  __m512 a[VV];
  for (int c = 0; c < VV; ++c) a[c] = acc[c];
  for (int64_t j = 0; j < m; ++j) {
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int c = 0; c < VV; ++c) a[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vt + j * Dv + c * 16), a[c]);
  }
  for (int c = 0; c < VV; ++c) acc[c] = a[c];
}

inline void weighted_values(__m512* acc, const float* p, const float* vt, int64_t Dv, int64_t m) {
  switch (Dv / 16) {
    case 4: weighted_values_regs<4>(acc, p, vt, Dv, m); return;
    case 8: weighted_values_regs<8>(acc, p, vt, Dv, m); return;
    default:
      for (int64_t c = 0; c < Dv / 16; ++c) weighted_values_regs<1>(acc + c, p, vt + c * 16, Dv, m);
  }
}

// Rows of one sequence that attend together (prompt rows), and the kv head: each block of 16 context
// positions' keys is transposed to fp32 once (kt[d][j]) and serves every (row, query head) of the tile, with
// no horizontal sums: lane j of x[i] accumulates q[c·16 + i]·k_j[c·16 + i] over c, exactly the chain lane i
// of the row path's dot accumulates for position j, and the 16 x[i] are added in sum16's tree order. Values
// are converted once per block too. Every output gets the row path's operations in the row path's order, so
// a token attends bit for bit the same as a prompt row or a decoding row.
template <typename T>
void attend_tile(int64_t r0, int64_t rows, int64_t hk, const float* q, const int64_t* ctx, const int64_t* len,
                 const T* kc, const T* vc, T* op, int64_t H, int64_t Hkv, int64_t D, int64_t Dv, float scale,
                 int64_t Lpad, std::vector<float>& sc, std::vector<float>& kt, std::vector<float>& vt,
                 std::vector<__m512>& acc) {
  const int64_t group = H / Hkv, dv = D / 16, vv = Dv / 16, queries = rows * group;
  int64_t Lt = 0;
  for (int64_t t = 0; t < rows; ++t) Lt = std::max(Lt, len[r0 + t]);
  for (int64_t l0 = 0; l0 < Lt; l0 += 16) {
    const int64_t n = std::min<int64_t>(16, Lt - l0);
    for (int64_t c = 0; c < dv; ++c) {  // kt[(c·16 + i)·16 + j] = k_j[c·16 + i], 16 x 16 at a time
      __m512 block[16];
      for (int64_t j = 0; j < 16; ++j) {
        block[j] = j < n ? loadv(kc + (ctx[l0 + j] * Hkv + hk) * D + c * 16) : _mm512_setzero_ps();
      }
      transpose16(block);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt.data() + (c * 16 + i) * 16, block[i]);
    }
    for (int64_t qi = 0; qi < queries; ++qi) {
      const int64_t t = qi / group, h = hk * group + qi % group;
      if (l0 >= len[r0 + t]) continue;
      const float* qh = q + ((r0 + t) * H + h) * D;
      __m512 x[16];
      for (int i = 0; i < 16; ++i) x[i] = _mm512_mul_ps(_mm512_set1_ps(qh[i]), _mm512_loadu_ps(kt.data() + i * 16));
      for (int64_t c = 1; c < dv; ++c) {  // 16 independent chains per step
        for (int i = 0; i < 16; ++i) {
          x[i] = _mm512_fmadd_ps(_mm512_set1_ps(qh[c * 16 + i]), _mm512_loadu_ps(kt.data() + (c * 16 + i) * 16), x[i]);
        }
      }
      __m512 s4[4];
      for (int k = 0; k < 4; ++k) {
        s4[k] = _mm512_add_ps(_mm512_add_ps(x[4 * k], x[4 * k + 2]), _mm512_add_ps(x[4 * k + 1], x[4 * k + 3]));
      }
      const __m512 total = _mm512_add_ps(_mm512_add_ps(s4[0], s4[1]), _mm512_add_ps(s4[2], s4[3]));
      _mm512_storeu_ps(sc.data() + qi * Lpad + l0, _mm512_mul_ps(total, _mm512_set1_ps(scale)));
    }
  }
  std::vector<float> inv(queries);
  for (int64_t qi = 0; qi < queries; ++qi) {
    inv[qi] = softmax_numerators(sc.data() + qi * Lpad, len[r0 + qi / group]);
    for (int64_t c = 0; c < vv; ++c) acc[qi * vv + c] = _mm512_setzero_ps();
  }
  for (int64_t l0 = 0; l0 < Lt; l0 += 16) {
    const int64_t n = std::min<int64_t>(16, Lt - l0);
    for (int64_t j = 0; j < n; ++j) {
      const T* v = vc + (ctx[l0 + j] * Hkv + hk) * Dv;
      for (int64_t c = 0; c < vv; ++c) _mm512_storeu_ps(vt.data() + j * Dv + c * 16, loadv(v + c * 16));
    }
    for (int64_t qi = 0; qi < queries; ++qi) {
      const int64_t m = std::min<int64_t>(n, len[r0 + qi / group] - l0);
      if (m > 0) weighted_values(acc.data() + qi * vv, sc.data() + qi * Lpad + l0, vt.data(), Dv, m);
    }
  }
  for (int64_t qi = 0; qi < queries; ++qi) {
    const int64_t t = qi / group, h = hk * group + qi % group;
    T* o = op + (r0 + t) * H * Dv + h * Dv;
    const __m512 scale_q = _mm512_set1_ps(inv[qi]);
    for (int64_t c = 0; c < vv; ++c) storev(o + c * 16, _mm512_mul_ps(acc[qi * vv + c], scale_q));
  }
}

template <typename T>
void paged_attention_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          at::Tensor& key_cache, at::Tensor& value_cache, const int64_t* slot,
                          const int64_t* gp, int64_t Lmax, const int64_t* seq, const int64_t* len, int64_t H,
                          int64_t Hkv, float scale, int64_t pair_dims, at::Tensor& out) {
  const int64_t R = qkv.size(0), D = key_cache.size(2), Dv = value_cache.size(2), width = qkv.size(1);
  const int64_t cos_width = pair_dims > 0 ? pair_dims / 2 : D;  // (see paged_attention)
  const int64_t group = H / Hkv, dv = D / 16, vv = Dv / 16;
  const T* src = qkv.data_ptr<T>();
  T* kc = key_cache.data_ptr<T>();
  T* vc = value_cache.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Every row's k and v into the cache first (a prompt row attends to the rows before it in this call), and
  // every row's rotated q, in fp32; k is rotated in fp32 and stored in the cache's dtype, as
  // F.scaled_dot_product_attention on the module path sees it.
  std::vector<float> q(R * H * D);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> head(D);
    for (int64_t r = begin; r < end; ++r) {
      const T* row = src + r * width;
      for (int64_t h = 0; h < H + Hkv; ++h) {
        float* dst = h < H ? q.data() + (r * H + h) * D : head.data();
        for (int64_t d = 0; d < D; ++d) dst[d] = to_float(row[h * D + d]);
        if (pair_dims > 0) {
          rotate_pairs(dst, cp + r * cos_width, sp + r * cos_width, pair_dims);
        } else {
          rotate(dst, cp + r * D, sp + r * D, D);
        }
        if (h >= H) {
          T* k = kc + (slot[r] * Hkv + (h - H)) * D;
          for (int64_t d = 0; d < D; ++d) k[d] = static_cast<T>(dst[d]);
        }
      }
      std::memcpy(vc + slot[r] * Hkv * Dv, row + (H + Hkv) * D, Hkv * Dv * sizeof(T));
    }
  });
  // Work items: a row alone (a decoding sequence; all its heads: a context position's keys, then values, for
  // every kv head are one contiguous row of the cache, read whole, each shared by the `group` query heads it
  // serves), or up to kTileRows consecutive rows of one sequence (a prompt chunk) with one kv head
  // (attend_tile). A row's arithmetic is the same either way and whatever else the call holds, so a token
  // attends the same as a decoding row, a prompt row, or in any chunking of its prompt.
  constexpr int64_t kTileRows = 8;
  struct Item { int64_t r0, rows, hk; };  // hk < 0: the row path
  std::vector<Item> items;
  for (int64_t r = 0; r < R;) {
    int64_t same = 1;
    while (r + same < R && seq[r + same] == seq[r]) ++same;
    if (same == 1) {
      items.push_back({r, 1, -1});
    } else {
      for (int64_t t = 0; t < same; t += kTileRows)
        for (int64_t hk = 0; hk < Hkv; ++hk) items.push_back({r + t, std::min(kTileRows, same - t), hk});
    }
    r += same;
  }
  const int64_t Lpad = (Lmax + 15) / 16 * 16;
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(std::max(H, kTileRows * group) * Lpad);
    std::vector<__m512> acc(std::max(H, kTileRows * group) * vv), qv(H * dv), part(H * 16), kv(dv);
    std::vector<float> inv(H), kt(D * 16), vt(16 * Dv);
    const int64_t row_bytes_k = Hkv * D, row_bytes_v = Hkv * Dv;  // in elements
    for (int64_t item = begin; item < end; ++item) {
      const Item it = items[item];
      if (it.hk >= 0) {
        attend_tile<T>(it.r0, it.rows, it.hk, q.data(), gp + seq[it.r0] * Lmax, len, kc, vc, op, H, Hkv, D, Dv,
                       scale, Lpad, p, kt, vt, acc);
        continue;
      }
      const int64_t r = it.r0;
      const int64_t L = len[r];
      const int64_t* ctx = gp + seq[r] * Lmax;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < dv; ++c) qv[h * dv + c] = _mm512_loadu_ps(q.data() + (r * H + h) * D + c * 16);
      }
      // scores, 16 positions a time. The rows come from all over a KV pool the step's weights have just
      // pushed out of cache, and hardware prefetchers don't follow the gather: fetch the keys a block ahead
      // and the values now, for the weighted sum below.
      for (int64_t j = 0; j < std::min<int64_t>(16, L); ++j) prefetch_row(kc + ctx[j] * row_bytes_k, row_bytes_k);
      for (int64_t l0 = 0; l0 < L; l0 += 16) {
        const int64_t n = std::min<int64_t>(16, L - l0);
        for (int64_t j = 0; j < n; ++j) {
          if (l0 + 16 + j < L) prefetch_row(kc + ctx[l0 + 16 + j] * row_bytes_k, row_bytes_k);
          prefetch_row(vc + ctx[l0 + j] * row_bytes_v, row_bytes_v);
          const T* krow = kc + ctx[l0 + j] * row_bytes_k;
          for (int64_t hk = 0; hk < Hkv; ++hk) {
            for (int64_t c = 0; c < dv; ++c) kv[c] = loadv(krow + hk * D + c * 16);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = hk * group + g;
              __m512 a = _mm512_mul_ps(qv[h * dv], kv[0]);
              for (int64_t c = 1; c < dv; ++c) a = _mm512_fmadd_ps(qv[h * dv + c], kv[c], a);
              part[h * 16 + j] = a;
            }
          }
        }
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t j = n; j < 16; ++j) part[h * 16 + j] = _mm512_setzero_ps();
          _mm512_storeu_ps(p.data() + h * Lpad + l0, _mm512_mul_ps(sum16(part.data() + h * 16), _mm512_set1_ps(scale)));
        }
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax numerators in place, and each head's 1 / sum
        inv[h] = softmax_numerators(p.data() + h * Lpad, L);
        for (int64_t c = 0; c < vv; ++c) acc[h * vv + c] = _mm512_setzero_ps();
      }
      if (item + 1 < end && items[item + 1].hk < 0) {  // the next row's first keys, while this one finishes
        const int64_t next = items[item + 1].r0;
        const int64_t* next_ctx = gp + seq[next] * Lmax;
        for (int64_t j = 0; j < std::min<int64_t>(16, len[next]); ++j) prefetch_row(kc + next_ctx[j] * row_bytes_k, row_bytes_k);
      }
      for (int64_t l = 0; l < L; ++l) {
        const T* vrow = vc + ctx[l] * row_bytes_v;
        for (int64_t hk = 0; hk < Hkv; ++hk) {
          for (int64_t c = 0; c < vv; ++c) {
            const __m512 x = loadv(vrow + hk * Dv + c * 16);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = hk * group + g;
              acc[h * vv + c] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * Lpad + l]), x, acc[h * vv + c]);
            }
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        T* o = op + r * H * Dv + h * Dv;
        const __m512 scale_h = _mm512_set1_ps(inv[h]);
        for (int64_t c = 0; c < vv; ++c) storev(o + c * 16, _mm512_mul_ps(acc[h * vv + c], scale_h));
      }
    }
  });
}

// qkv: [R, (H + 2 Hkv) D], one new token per row (a decoding sequence's, or one of a prompt chunk's);
// cos/sin [R, D]; caches [S, Hkv, D]; slots [R] (where each row's k/v go); gather [G, Lmax] context slots
// of G sequences in position order; row_seq [R] which gather row a row reads (None: row r reads row r);
// lengths [R] how many of them (its own position + 1: a prompt row sees the rows before it). All floating
// tensors share one dtype (fp32 or bf16). Returns the attention output [R, H Dv].
// interleaved_rotary_dim: 0 (Llama) rotates each head's halves (rotate), with cos/sin [R, D]; n > 0 (GLM)
// rotates the adjacent pairs of its first n dims (rotate_pairs), with cos/sin [R, n / 2].
at::Tensor paged_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slots,
                            const at::Tensor& gather, const at::Tensor& lengths, int64_t H, int64_t Hkv,
                            double scale, const std::optional<at::Tensor>& row_seq,
                            int64_t interleaved_rotary_dim) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "fp32 or bf16 only");
  const at::Tensor* floating[] = {&qkv, &cos, &sin, &key_cache, &value_cache};
  for (const at::Tensor* t : floating) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(),
                "qkv, cos, sin and the caches must be contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(qkv.dim() == 2 && key_cache.dim() == 3 && value_cache.dim() == 3, "qkv [R, *], caches [S, Hkv, D]");
  const int64_t R = qkv.size(0), D = key_cache.size(2), Dv = value_cache.size(2), S = key_cache.size(0);
  TORCH_CHECK(key_cache.size(1) == Hkv && value_cache.size(1) == Hkv && value_cache.size(0) == S, "cache shapes");
  TORCH_CHECK(qkv.size(1) == (H + Hkv) * D + Hkv * Dv, "qkv width");
  TORCH_CHECK(D % 16 == 0 && Dv % 16 == 0, "head dims must be multiples of 16");
  const int64_t pair_dims = interleaved_rotary_dim;
  TORCH_CHECK(pair_dims >= 0 && pair_dims % 2 == 0 && pair_dims <= D, "interleaved_rotary_dim: even, at most D");
  if (pair_dims > 0) {
    TORCH_CHECK(cos.numel() == R * pair_dims / 2 && sin.numel() == R * pair_dims / 2,
                "cos/sin: [R, interleaved_rotary_dim / 2]");
  } else {
    TORCH_CHECK(cos.numel() == R * D && sin.numel() == R * D, "cos/sin: [R, D]");
  }
  TORCH_CHECK(slots.scalar_type() == at::kLong && gather.scalar_type() == at::kLong &&
                  lengths.scalar_type() == at::kLong && gather.is_contiguous() && slots.is_contiguous() &&
                  lengths.is_contiguous() && gather.dim() == 2 && slots.numel() == R && lengths.numel() == R,
              "slots [R], gather [G, Lmax], lengths [R]: int64");
  const int64_t G = gather.size(0), Lmax = gather.size(1);
  std::vector<int64_t> identity;
  const int64_t* seq = nullptr;
  if (row_seq.has_value()) {
    TORCH_CHECK(row_seq->scalar_type() == at::kLong && row_seq->is_contiguous() && row_seq->numel() == R,
                "row_seq [R]: int64");
    seq = row_seq->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(G == R, "without row_seq, gather has one row per row of qkv");
    identity.resize(R);
    for (int64_t r = 0; r < R; ++r) identity[r] = r;
    seq = identity.data();
  }
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* gp = gather.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  std::vector<int64_t> longest(G, 0);  // the most positions any row reads of each gather row
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(slot[r] >= 0 && slot[r] < S, "slot out of range");
    TORCH_CHECK(seq[r] >= 0 && seq[r] < G, "row_seq out of range");
    TORCH_CHECK(len[r] >= 1 && len[r] <= Lmax, "length out of range");
    longest[seq[r]] = std::max(longest[seq[r]], len[r]);
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t l = 0; l < longest[g]; ++l) TORCH_CHECK(gp[g * Lmax + l] >= 0 && gp[g * Lmax + l] < S, "context slot out of range");
  }
  at::Tensor out = at::empty({R, H * Dv}, qkv.options());
  if (dtype == at::kFloat) {
    paged_attention_impl<float>(qkv, cos, sin, key_cache, value_cache, slot, gp, Lmax, seq, len, H, Hkv,
                                static_cast<float>(scale), pair_dims, out);
  } else {
    paged_attention_impl<at::BFloat16>(qkv, cos, sin, key_cache, value_cache, slot, gp, Lmax, seq, len, H, Hkv,
                                       static_cast<float>(scale), pair_dims, out);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The compute entry points drop the GIL while they run (arguments are converted before, the result after),
  // as ATen's own ops do: the server's event loop shares the process with the engine thread, and would
  // otherwise get a turn only between two kernels, after waiting out Python's switch interval.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("int8_linear", &int8_linear, no_gil, "int8 weight-only linear", py::arg("x"), py::arg("w"),
        py::arg("scale"), py::arg("bias") = py::none(), py::arg("norm_weight") = py::none(), py::arg("eps") = 0.0,
        py::arg("silu_mul") = false, py::arg("residual") = py::none());
  m.def("int4_linear", &int4_linear, no_gil, "group-wise int4 weight-only linear", py::arg("x"), py::arg("w"),
        py::arg("scales_and_zeros"), py::arg("bias") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 0.0, py::arg("silu_mul") = false,
        py::arg("residual") = py::none());
  m.def("int8_linear_lanes", &int8_linear_lanes, no_gil, "int8_linear for weights in lane layout (int8_to_lanes)",
        py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("bias") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 0.0, py::arg("silu_mul") = false,
        py::arg("residual") = py::none());
  m.def("int4_linear_lanes", &int4_linear_lanes, no_gil, "int4_linear for weights in lane layout (int4_to_lanes)",
        py::arg("x"), py::arg("w"), py::arg("scales_and_zeros"), py::arg("bias") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 0.0, py::arg("silu_mul") = false,
        py::arg("residual") = py::none());
  m.def("set_vnni", &set_vnni, "int8_linear and int4_linear on int8 activations + AVX512-VNNI (true, the default "
        "where the CPU has it) or on fp32 activations (false); returns the previous setting", py::arg("enabled"));
  m.def("vnni_supported", [] { return kCpuHasVnni; }, "whether this CPU has AVX512-VNNI");
  m.def("activation_path", [] { return use_vnni.load() ? "vnni" : "fp32"; },
        "what int8_linear and int4_linear multiply the weights with: int8 activations (vnni) or fp32 ones");
  m.def("int4_dequantize", &int4_dequantize, no_gil, "int4 (native layout) -> bf16 [N, K]");
  m.def("paged_attention", &paged_attention, no_gil,
        "rotary + KV write + paged attention for decoding and prompt rows alike", py::arg("qkv"), py::arg("cos"),
        py::arg("sin"), py::arg("key_cache"), py::arg("value_cache"), py::arg("slots"), py::arg("gather"),
        py::arg("lengths"), py::arg("H"), py::arg("Hkv"), py::arg("scale"), py::arg("row_seq") = py::none(),
        py::arg("interleaved_rotary_dim") = 0);
  m.def("rms_norm_add", &rms_norm_add, no_gil, "residual + rms_norm(x) * weight", py::arg("x"), py::arg("weight"),
        py::arg("eps"), py::arg("residual"));
}
