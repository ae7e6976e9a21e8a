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


}  // namespace
}  // namespace cpullm
