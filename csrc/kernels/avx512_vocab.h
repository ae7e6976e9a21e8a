// The AVX-512 (F, BW, VL, DQ) vocabulary of kernels_impl.h, for the files built with at least those
// flags (kernels_avx512.cpp and kernels_avx512bf16.cpp). In an anonymous namespace, so that each
// translation unit has its own copy (see kernels_impl.h).
#pragma once
#include <immintrin.h>

#include "kernels/kernels_impl.h"

namespace cpullm {
namespace {

struct Avx512V {
  static constexpr int W = 16;
  using Vec = __m512;
  static inline __mmask16 lane_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static inline Vec zero() { return _mm512_setzero_ps(); }
  static inline Vec set1(float a) { return _mm512_set1_ps(a); }
  static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline Vec load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
  static inline Vec load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline Vec load_bf16_partial(const uint16_t* p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(lane_mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline Vec load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // float_to_half's bits: F16C's nearest even, after its saturation at +-65504 (F16C would round past
  // it to infinity), and its one NaN for every NaN.
  static inline void store_f16(uint16_t* p, Vec v) {
    const __m512 top = _mm512_set1_ps(65504.f), bottom = _mm512_set1_ps(-65504.f);
    const __m256i h = _mm512_cvtps_ph(_mm512_max_ps(_mm512_min_ps(v, top), bottom),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
    const __m256i nan = _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7e00)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm256_mask_blend_epi16(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), h, nan));
  }
  static inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
  static inline void store_partial(float* p, Vec a, int n) { _mm512_mask_storeu_ps(p, lane_mask(n), a); }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  static inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static inline Vec round_nearest(Vec a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline Vec scale_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
  static inline Vec exp(Vec x) { return exp_approx<Avx512V>(x); }
  static inline float reduce(Vec a) { return _mm512_reduce_add_ps(a); }
};

}  // namespace
}  // namespace cpullm
