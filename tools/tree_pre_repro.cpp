// GCC's tree PRE and the int8 tiles' accumulators (docs/performance.md, seventh round): a 4-token x
// 2-block one-digit tile of the same shape as kernels_avx512vnni.cpp's, reduced to its loops. Compile it
// to an object and count the register-to-register vector moves GCC puts around the vpdpbusd:
//
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -c tools/tree_pre_repro.cpp \
//       -o /tmp/repro.o && objdump -d --no-show-raw-insn /tmp/repro.o | grep -c 'vmovdqa'
//
// and again with -fno-tree-pre added (or -O2), or with clang. GCC 12 at -O3: 30 moves, 16 of them in
// the inner loop (every accumulator copied twice per step); with -fno-tree-pre the inner loop has none.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

template <int TT, int RB>
void tile(const uint8_t* const* blk, const int8_t* const* xt, int64_t quads, int64_t G, int64_t group_bytes,
          float* out, const float* scales) {
  __m512 acc[TT][RB];
  for (int t = 0; t < TT; ++t)
    for (int b = 0; b < RB; ++b) acc[t][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i hi[TT][RB];
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b) hi[t][b] = _mm512_setzero_si512();
    for (int64_t i = 0; i < quads; ++i) {
      __m512i wv[RB];
      for (int b = 0; b < RB; ++b) wv[b] = _mm512_loadu_si512(blk[b] + g * group_bytes + i * 64);
      for (int t = 0; t < TT; ++t) {
        int32_t h4;
        std::memcpy(&h4, xt[t] + g * 32 + 4 * i, 4);
        const __m512i xh = _mm512_set1_epi32(h4);
        for (int b = 0; b < RB; ++b) hi[t][b] = _mm512_dpbusd_epi32(hi[t][b], wv[b], xh);
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b)
        acc[t][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[t][b]), _mm512_set1_ps(scales[g * TT + t]), acc[t][b]);
  }
  for (int t = 0; t < TT; ++t)
    for (int b = 0; b < RB; ++b) _mm512_storeu_ps(out + (t * RB + b) * 16, acc[t][b]);
}

template void tile<4, 2>(const uint8_t* const*, const int8_t* const*, int64_t, int64_t, int64_t, float*, const float*);
