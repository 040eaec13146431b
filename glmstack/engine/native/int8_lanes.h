// int8 weights x int8 activations with one output per lane (AVX512-VNNI), included by kernels.cpp after
// int4_lanes.h (whose activation blocks, QuantizedRows, it takes).
//
// vnni_tile keeps 128 inputs of one weight row across a vector: per 128 weights and activation row it pays two
// loads, two shuffles and two XORs to regroup and flip them, two VPDPBUSD, and a horizontal sum per output. At
// batch 1 on a real-size head (151,552 x 2,048) that ran at ~29 GiB/s for two threads, where the int4 kernel
// on stored lanes reads ~35. So Int8Linear stores its weights (on VNNI CPUs; glmstack/engine/quant/int8.py
// `int8_to_lanes`, once at load) per tile of 16 rows and 32-input block as dword j (inputs 4j..4j+3) of the 16
// rows side by side, already flipped to unsigned (w + 128): 512 contiguous bytes, 8 loads and 8 VPDPBUSD for 16
// outputs. The +128 comes back out as -128 x the block's code sum, the same for every lane.
//
// Per block b of activation row m and output lane r:
//   d      = -128 sum(xq_b) + sum_k (w_k + 128) xq_k     (int32, exact: w . xq)
//   acc_r += float(d) * dx_b                             (in block order)
// and the epilogue multiplies by the row's scale. The same operations per output for any row count.

constexpr int64_t INT8_TILE_BLOCK_BYTES = OT * QBLOCK;  // 512

template <int MT>
__attribute__((target("avx512vnni"))) void int8_lane_rows(const QuantizedRows& qx, const uint8_t* wt, int64_t K,
                                                          int64_t m0, int64_t n0, const Epilogue& ep) {
  const int64_t blocks = K / QBLOCK;
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i* v = reinterpret_cast<const __m512i*>(wt + b * INT8_TILE_BLOCK_BYTES);
    const char* ahead = reinterpret_cast<const char*>(v) + 8192;
    for (int line = 0; line < 8; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    __m512i w[8];
    for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(v + j);
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * blocks + b;
      const int8_t* xq = qx.q + (m0 + m) * K + b * QBLOCK;
      __m512i d = _mm512_set1_epi32(16 * qx.minus8[i]);  // -128 x the block's code sum
      for (int j = 0; j < 8; ++j) {
        int32_t four;
        std::memcpy(&four, xq + 4 * j, 4);
        d = _mm512_dpbusd_epi32(d, w[j], _mm512_set1_epi32(four));
      }
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(qx.dx[i]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(64) float out[OT];
    _mm512_store_ps(out, acc[m]);
    for (int64_t r = 0; r < OT; ++r) ep.store(m0 + m, n0 + r, out[r]);
  }
}

// y = x w^T for int8 weights in lane layout (N a multiple of 16, K of 32): tiles of 16 rows across ATen's threads.
void int8_stored_lanes_linear(const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K,
                              const Epilogue& ep) {
  const QuantizedRows qx = quantize_rows(x, M, K, K);  // one "group": its sum is not used here
  const int64_t tiles = N / OT, tile_bytes = OT * K;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / tile_bytes);  // ~64 KiB of weights per task
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* wt = w + t * tile_bytes;
      const int64_t n0 = t * OT;
      int64_t m = 0;
      for (; m + MT4 <= M; m += MT4) int8_lane_rows<MT4>(qx, wt, K, m, n0, ep);
      if (M - m >= 4) int8_lane_rows<4>(qx, wt, K, m, n0, ep), m += 4;
      if (M - m >= 2) int8_lane_rows<2>(qx, wt, K, m, n0, ep), m += 2;
      if (M - m >= 1) int8_lane_rows<1>(qx, wt, K, m, n0, ep);
    }
  });
}
