// 8-lane int8 vocabularies for Q8Impl on x86 (see q8_impl.h). Included only by files compiled with at
// least AVX2; everything is in an anonymous namespace so no definition is shared across ISA files.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/q8_impl.h"

namespace cpullm {
namespace {

// AVX2: no signed x signed byte multiply exists, so |x| (unsigned) times w carrying x's sign feeds
// maddubs (u8 x s8 -> s16 pairs; |products| <= 2 * 127 * 127 cannot saturate), then madd to 32 bits.
struct Q8Avx2 {
  using I = __m256i;
  using F = __m256;
  static inline I izero() { return _mm256_setzero_si256(); }
  static inline F fzero() { return _mm256_setzero_ps(); }
  static inline I load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I load_partial(const int8_t* p, int n) {
    alignas(32) int8_t buf[kQ8Block] = {};
    std::memcpy(buf, p, static_cast<size_t>(n));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
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
  static inline F fma_scaled(F f, I i, float s) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s), f); }
  static inline float reduce(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#if defined(__AVX512VNNI__)
// AVX512-VNNI: vpdpbusd does the u8 x s8 multiply and the 4-way add into 32 bits in one instruction.
struct Q8Vnni : Q8Avx2 {
  static inline I dot(I acc, I x, I w) {
    return _mm256_dpbusd_epi32(acc, _mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  }
};
#endif

}  // namespace
}  // namespace cpullm
