// int4 weights x int8 activations with one output per lane (AVX512-VNNI), included by kernels.cpp.
//
// kernels.cpp's first VNNI kernel (vnni_tile) keeps a weight row's 128 inputs across a vector's lanes: per
// 128 weights and activation row it pays 2 VPDPBUSD and then 3 fp32 ops (convert, scale product, FMA) for the
// group scales, plus a horizontal sum per output. With 16 rows in a step the fp32 ops were most of the work
// (benchmarks/bench_step_profile.py: the int4 linears ran at ~65-80% of that loop's ceiling and took 3/4 of a
// 16-stream step). Here a vector holds 16 *outputs* instead: lane r of quad j is inputs 4j..4j+3 of one 32-input
// block of weight row n0 + r, so one block of one activation row costs 8 VPDPBUSD (the row's 4 bytes
// broadcast) and the same 3 fp32 ops for 16 outputs - 512 multiply-adds where vnni_tile did 128 - and no
// horizontal sums.
//
// The packed rows (16 bytes per 32 inputs: byte i holds input i in its low nibble, input i + 16 in its high
// one) are turned into that layout per tile of 16 weight rows by a 16 x 16 dword transpose: dword j of a
// block is inputs 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high nibbles), i.e. quads j and 4 + j. A tile
// is unpacked once per call into a per-thread buffer, group scales and zeros as 16-lane vectors beside it,
// and every activation row of the call runs against it - decode's one row as a prompt's hundreds, with the
// same operations per output in the same order: a row's result is the same bits whatever else the call holds.
//
// Per block b of activation row m and output lane r:
//   d      = -8 sum(xq_b) + sum_k q_k xq_k              (int32, exact: (q - 8) . xq)
//   acc_r += float(d) * (s_r,g * dx_b)                   (in block order)
// then acc_r += z_r,g * xsum_g for each group g in order (xsum: the sum of x^ over the group).

constexpr int64_t OT = 16;  // weight rows (outputs) per tile: one per lane
constexpr int MT4 = 8;      // activation rows per register tile

// Activation rows as int8 in input order, per 32-input block its dx and -8 x its code sum, per group its x^ sum.
struct QuantizedRows {
  const int8_t* q;        // [M, K]
  const float* dx;        // [M, K / 32]
  const int32_t* minus8;  // [M, K / 32]
  // [M, K / G]: the group's sum of x^ = dx_b * xq, not of x (as llama.cpp's Q8_1 blocks). The kernel then
  // computes w . x^ exactly (to fp32 rounding): error sum_k w_k (x^_k - x_k), a plain dot that tests can
  // check. With the sum of x it would be sum_k (w_k - z_g)(x^_k - x_k), and z_g = min + 8 s_g is not the
  // centre of a near-zero-mean group: 7% more error on SmolLM2's projections with its own activations.
  const float* xsum;
};

// Activations of x (fp32 [M, K]) in a per-thread buffer, valid until the next call on this thread.
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t G) {
  thread_local std::vector<uint64_t> buffer;
  const int64_t blocks = K / QBLOCK, groups = K / G;
  auto padded = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t q_bytes = padded(M * K), block_bytes = padded(M * blocks * 4), xsum_bytes = padded(M * groups * 4);
  buffer.resize((q_bytes + 2 * block_bytes + xsum_bytes + 64) / 8 + 1);
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64);
  int8_t* q = reinterpret_cast<int8_t*>(p);
  float* dx = reinterpret_cast<float*>(p += q_bytes);
  int32_t* minus8 = reinterpret_cast<int32_t*>(p += block_bytes);
  float* xsum = reinterpret_cast<float*>(p + block_bytes);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      std::fill(xsum + m * groups, xsum + (m + 1) * groups, 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const float* xb = x + m * K + b * QBLOCK;
        int8_t* qb = q + m * K + b * QBLOCK;
        const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
        const int64_t i = m * blocks + b;
        if (amax < 1e-30f) {  // as quantize_row_q8: dx 0 and codes 0 for (near-)zero blocks
          std::memset(qb, 0, QBLOCK);
          dx[i] = 0.f;
          minus8[i] = 0;
          continue;
        }
        const __m512 inv = _mm512_set1_ps(127.f / amax);
        const __m512i ql = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qh = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(ql));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(qh));
        // the sum of the stored (saturated) codes, which is what VPDPBUSD multiplies
        const __m512i stored = _mm512_add_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<__m128i*>(qb))),
                                                _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<__m128i*>(qb + 16))));
        const int32_t total = _mm512_reduce_add_epi32(stored);
        const float d = amax / 127.f;
        dx[i] = d;
        minus8[i] = -8 * total;
        xsum[m * groups + b * QBLOCK / G] += d * static_cast<float>(total);
      }
    }
  });
  return {q, dx, minus8, xsum};
}

// 16 x 16 dwords: r[i] lane e -> r[e] lane i.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3]
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // per 128-bit lane L of group i/4: element 4L + k of rows i..i+3 in r[i + k]
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // gather lane L of the four row groups: element 4L + k of all 16 rows
    const __m512i lo01 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x44), hi01 = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xEE);
    t[k] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// One tile of the row layout rearranged into the lane layout below (what glmstack/engine/quant/int4.py
// `int4_to_lanes` stores): per block its 4 dwords as 16-lane vectors; scales then zeros as [group][16], fp32.
struct LaneTile {
  std::vector<__m512i> dwords;  // [blocks * 4]
  std::vector<float> sz;        // [2 * groups * 16]
};

// Rows n0..n0+15 of the packed weights (rows past N repeat the last one; their outputs are not stored).
void unpack_tile(const uint8_t* w, const void* sz, bool sz_bf16, int64_t N, int64_t K, int64_t G, int64_t n0,
                 LaneTile& tile) {
  const int64_t row_bytes = K / 2, blocks = K / QBLOCK, groups = K / G;
  tile.dwords.resize(blocks * 4);
  tile.sz.resize(2 * groups * OT);
  for (int64_t c = 0; c * 64 < row_bytes; ++c) {  // 64 bytes = 4 blocks of each row
    const int64_t bytes = std::min<int64_t>(64, row_bytes - c * 64);
    const __mmask64 mask = bytes == 64 ? ~__mmask64{0} : (uint64_t{1} << bytes) - 1;
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      const uint8_t* p = w + std::min(n0 + i, N - 1) * row_bytes + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + OT * row_bytes), _MM_HINT_T0);  // the next tile's
      r[i] = _mm512_maskz_loadu_epi8(mask, p);
    }
    transpose16x16(r);  // r[4 blk + j]: dword j of block blk, all 16 rows
    for (int64_t k = 0; k < bytes / 4; ++k) tile.dwords[c * 16 + k] = r[k];
  }
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {  // scales and zeros of 16 groups: 16 loads + a transpose each
    const int64_t count = std::min<int64_t>(16, groups - g0);
    const __mmask16 mask = count == 16 ? __mmask16{0xFFFF} : tail_mask(count);
    __m512i s[16], z[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t base = std::min(n0 + i, N - 1) * 2 * groups + g0;
      s[i] = _mm512_castps_si512(load16(sz, base, sz_bf16, mask));
      z[i] = _mm512_castps_si512(load16(sz, base + groups, sz_bf16, mask));
    }
    transpose16x16(s);
    transpose16x16(z);
    for (int64_t k = 0; k < count; ++k) {
      _mm512_storeu_si512(tile.sz.data() + (g0 + k) * OT, s[k]);
      _mm512_storeu_si512(tile.sz.data() + (groups + g0 + k) * OT, z[k]);
    }
  }
}

// ---- The lane layout, and the kernel on it ------------------------------------------------------------------
//
// Per tile of 16 rows, per block, the 4 dwords j as 16-lane vectors (dword j of row n0 + r in lane r: 256 bytes
// per block, contiguous), and the tile's scales then zeros as [group][16 lanes]. A block is 4 loads and 12 nibble
// ops away from its 8 quads. Int4Linear stores its weights this way where the VNNI path is on (glmstack/engine/
// quant/int4.py `int4_to_lanes`, a permutation done once at load), read in one sequential stream per tile: with
// the 16 x 16 transposes paid per call instead (unpack_tile, for weights in row layout), decode ran at ~16 GiB/s
// per thread from cache, ~20 GiB/s for two threads from memory, about half of what the memory delivers. Both
// layouts go through lane_rows, so they give the same bits.

// y[m0 .. m0 + MT) x [n0, n0 + valid) from one tile in lane layout (wt: its weights, szt: its scales and zeros).
template <int MT>
__attribute__((target("avx512vnni"))) void lane_rows(const QuantizedRows& qx, const uint8_t* wt, const void* szt,
                                                     bool sz_bf16, int64_t K, int64_t G, int64_t m0, int64_t n0,
                                                     int64_t valid, const Epilogue& ep) {
  const int64_t blocks = K / QBLOCK, groups = K / G, per_group = G / QBLOCK;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  __m512 s = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i* v = reinterpret_cast<const __m512i*>(wt + b * 256);
    const char* ahead = reinterpret_cast<const char*>(v) + 8192;
    for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    __m512i quads[8];
    for (int j = 0; j < 4; ++j) {
      const __m512i d = _mm512_loadu_si512(v + j);
      quads[j] = _mm512_and_si512(d, nibble);
      quads[4 + j] = _mm512_and_si512(_mm512_srli_epi32(d, 4), nibble);
    }
    if (b % per_group == 0) s = load16(szt, (b / per_group) * OT, sz_bf16, 0xFFFF);
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      const int8_t* xq = qx.q + (m0 + m) * K + b * QBLOCK;
      __m512i d = _mm512_set1_epi32(qx.minus8[i]);
      for (int j = 0; j < 8; ++j) {
        int32_t four;
        std::memcpy(&four, xq + 4 * j, 4);
        d = _mm512_dpbusd_epi32(d, quads[j], _mm512_set1_epi32(four));
      }
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(qx.dx[i])), acc[m]);
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 z = load16(szt, (groups + g) * OT, sz_bf16, 0xFFFF);
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(qx.xsum[(m0 + m) * groups + g]), acc[m]);
  }
  for (int m = 0; m < MT; ++m) {
    alignas(64) float out[OT];
    _mm512_store_ps(out, acc[m]);
    for (int64_t r = 0; r < valid; ++r) ep.store(m0 + m, n0 + r, out[r]);
  }
}

// Every activation row of the call against one tile.
void tile_rows(const QuantizedRows& qx, const uint8_t* wt, const void* szt, bool sz_bf16, int64_t M, int64_t K,
               int64_t G, int64_t n0, int64_t valid, const Epilogue& ep) {
  int64_t m = 0;
  for (; m + MT4 <= M; m += MT4) lane_rows<MT4>(qx, wt, szt, sz_bf16, K, G, m, n0, valid, ep);
  if (M - m >= 4) lane_rows<4>(qx, wt, szt, sz_bf16, K, G, m, n0, valid, ep), m += 4;
  if (M - m >= 2) lane_rows<2>(qx, wt, szt, sz_bf16, K, G, m, n0, valid, ep), m += 2;
  if (M - m >= 1) lane_rows<1>(qx, wt, szt, sz_bf16, K, G, m, n0, valid, ep);
}

// The VNNI int4 linear on weights in row layout: tiles of 16 weight rows across ATen's threads, each put in
// lane layout once per call for every row of x.
void int4_lanes_linear(const float* x, int64_t M, const uint8_t* w, const void* sz, bool sz_bf16, int64_t N,
                       int64_t K, int64_t G, const Epilogue& ep) {
  const QuantizedRows qx = quantize_rows(x, M, K, G);
  const int64_t tiles = (N + OT - 1) / OT;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (OT * K / 2));  // ~64 KiB of weights per task
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    thread_local LaneTile tile;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * OT;
      unpack_tile(w, sz, sz_bf16, N, K, G, n0, tile);
      tile_rows(qx, reinterpret_cast<const uint8_t*>(tile.dwords.data()), tile.sz.data(), false, M, K, G, n0,
                std::min(OT, N - n0), ep);
    }
  });
}

// The same for weights stored in lane layout (N a multiple of 16): nothing rearranged per call.
void int4_stored_lanes_linear(const float* x, int64_t M, const uint8_t* w, const void* sz, bool sz_bf16,
                              int64_t N, int64_t K, int64_t G, const Epilogue& ep) {
  const QuantizedRows qx = quantize_rows(x, M, K, G);
  const int64_t tiles = N / OT, groups = K / G, tile_bytes = OT * K / 2;
  const int64_t sz_bytes = sz_bf16 ? 2 : 4;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / tile_bytes);  // ~64 KiB of weights per task
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const void* szt = static_cast<const char*>(sz) + t * OT * 2 * groups * sz_bytes;
      tile_rows(qx, w + t * tile_bytes, szt, sz_bf16, M, K, G, t * OT, OT, ep);
    }
  });
}
