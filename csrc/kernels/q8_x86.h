// 8-lane int8 vocabularies for Q8Impl on x86 (see q8_impl.h). Included only by files compiled with at
// least AVX2; everything is in an anonymous namespace so no definition is shared across ISA files.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/q8_impl.h"

namespace cpullm {
namespace {

// Shared by the 256-bit vocabularies (this one and kernels_avx2.cpp's float one).
inline float hsum256(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Lanes [0, n) of 8.
inline __m256i mask256(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }

// AVX2: no signed x signed byte multiply exists, so |x| (unsigned) times w carrying x's sign feeds
// maddubs (u8 x s8 -> s16 pairs; |products| <= 2 * 127 * 127 cannot saturate), then madd to 32 bits.
struct Q8Avx2 {
  using I = __m256i;
  using F = __m256;
  static inline I izero() { return _mm256_setzero_si256(); }
  static inline F fzero() { return _mm256_setzero_ps(); }
  static inline I load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I flip(I v) { return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))); }
  static inline I weights(const uint8_t* p) { return flip(load(reinterpret_cast<const int8_t*>(p))); }
  static inline I seed(int32_t) { return izero(); }
  static inline I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
  }
  static inline I dot(I acc, I x, I w) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sw = _mm256_sign_epi8(w, x);
    const __m256i pairs = _mm256_maddubs_epi16(ax, sw);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static inline I combine(I hi, I lo) {
    return _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(hi, 7), hi), lo);
  }
  static inline I shl(I i, int32_t count) { return _mm256_sllv_epi32(i, _mm256_set1_epi32(count)); }
  static inline F fload(const float* p) { return _mm256_loadu_ps(p); }
  static inline void fstore(float* p, F f) { _mm256_storeu_ps(p, f); }
  static inline void fstore_partial(float* p, F f, int n) {
    _mm256_maskstore_ps(p, mask256(n), f);
  }
  static inline F fmul(F f, float s) { return _mm256_mul_ps(f, _mm256_set1_ps(s)); }
  static inline F fma_scaled(F f, I i, F s) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), s, f); }
  static inline F fma_scaled(F f, I i, float s) { return fma_scaled(f, i, _mm256_set1_ps(s)); }
  static inline float reduce(F a) { return hsum256(a); }
};

// Two-digit rows on AVX2 in Kernels::quantize_q8_wide's layout: each int16 x = 127 * hi + lo meets
// the weights widened to int16 in one madd (pairs of 16-bit products into 32 bits), where the digits
// took two sign fix-ups, a maddubs and a madd each. The integer sums are the digits' exactly, so the
// results are bit-identical to every other path. The stored weights are w + 128 (zero-extended here);
// the seed takes back 128 * sum(x), as with VNNI (|x| * 255 * 512 stays inside int32, and the sum is
// exact modulo 2^32 whatever the partial sums do). A 16-byte quarter of a quad is 4 rows x 4 inputs:
// its madd leaves each row's sum in two lanes (inputs 0-1, 2-3), which hadd joins at the group's end
// in the lane order [0 1 4 5 2 3 6 7]: the scales are taken in that order and the sums put back at the
// store.
struct Q8Avx2Wide {
  // 3 tokens: 12 sum registers (GCC spills one of them and keeps the f32 totals out of the inner
  // loop), and kernel_bench's two-digit shares were 53-56 % of the peak vs 48-53 % with 2 (SmolLM2
  // shapes, 128 tokens, 7 rounds, Zen 3); 4 tokens were between.
  static constexpr int kTokens = 3;
  static constexpr int blocks(int) { return 1; }

  static inline __m256 swap_middle(__m256 v) {  // [0 1 2 3 4 5 6 7] <-> [0 1 4 5 2 3 6 7]
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
  }

  template <int TT, int RB>
  static inline void tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, float* y, int64_t ldy) {
    const int64_t G = w.n_groups;
    const uint8_t* blk[RB];
    for (int b = 0; b < RB; ++b) blk[b] = w.data + (b0 + b) * w.block_bytes;
    const int16_t* xt[TT];
    for (int t = 0; t < TT; ++t) xt[t] = reinterpret_cast<const int16_t*>(x.q + (t0 + t) * 2 * x.stride);
    const __m256i even = _mm256_setr_epi32(-1, 0, -1, 0, -1, 0, -1, 0);
    __m256 acc[TT][RB][2];
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b) acc[t][b][0] = acc[t][b][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t quads = g + 1 == G ? w.last_quads : w.group / 4;
      const int64_t off = g * w.group_bytes, begin = g * w.group;
      __m256i part[TT][RB][4];
      for (int t = 0; t < TT; ++t) {
        const __m256i seed = _mm256_and_si256(_mm256_set1_epi32(-x.sums[(t0 + t) * G + g]), even);
        for (int b = 0; b < RB; ++b)
          for (int j = 0; j < 4; ++j) part[t][b][j] = seed;
      }
      for (int64_t i = 0; i < quads; ++i) {
        __m256i xv[TT];
        for (int t = 0; t < TT; ++t) {
          int64_t four;
          std::memcpy(&four, xt[t] + begin + 4 * i, sizeof four);
          xv[t] = _mm256_set1_epi64x(four);
        }
        for (int b = 0; b < RB; ++b) {
          const uint8_t* p = blk[b] + off + i * 64;
          if (TT > 1) __builtin_prefetch(p + RB * w.block_bytes);  // as Q8Impl's tiles
          for (int j = 0; j < 4; ++j) {
            const __m256i wv = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
            for (int t = 0; t < TT; ++t) part[t][b][j] = _mm256_add_epi32(part[t][b][j], _mm256_madd_epi16(wv, xv[t]));
          }
        }
      }
      for (int b = 0; b < RB; ++b) {
        const float* ws = reinterpret_cast<const float*>(blk[b] + off + quads * 64);
        const __m256 w0 = swap_middle(_mm256_loadu_ps(ws)), w1 = swap_middle(_mm256_loadu_ps(ws + 8));
        for (int t = 0; t < TT; ++t) {
          const __m256 s = _mm256_set1_ps(x.scales[(t0 + t) * G + g]);
          const __m256i rows0 = _mm256_hadd_epi32(part[t][b][0], part[t][b][1]);
          const __m256i rows1 = _mm256_hadd_epi32(part[t][b][2], part[t][b][3]);
          acc[t][b][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows0), _mm256_mul_ps(w0, s), acc[t][b][0]);
          acc[t][b][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows1), _mm256_mul_ps(w1, s), acc[t][b][1]);
        }
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b) {
        const int64_t row0 = (b0 + b) * kQ8Rows, rest = w.rows - row0;
        float* out = y + (t0 + t) * ldy + row0;
        const __m256 lo8 = swap_middle(acc[t][b][0]), hi8 = swap_middle(acc[t][b][1]);
        if (rest >= kQ8Rows) {
          Q8Avx2::fstore(out, lo8);
          Q8Avx2::fstore(out + 8, hi8);
        } else {
          Q8Avx2::fstore_partial(out, lo8, rest < 8 ? static_cast<int>(rest) : 8);
          if (rest > 8) Q8Avx2::fstore_partial(out + 8, hi8, static_cast<int>(rest - 8));
        }
      }
  }
};

// matmul_q8 for ISAs whose two-digit rows are in the wide layout (kernels_avx2.cpp, kernels_avx512.cpp);
// one-digit rows keep their int8 digits and the int8 tiles that skip the lo digits.
inline void matmul_q8_wide(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
  Q8Driver<Q8Avx2Wide, Q8Impl<Q8Avx2, false>>::matmul(x, w, b0, b1, y, ldy);
}

}  // namespace
}  // namespace cpullm
