// AVX2 + FMA path (Haswell and later, Zen). Compiled with -mavx2 -mfma; only called after dispatch
// has checked the CPU.
#include <immintrin.h>

#include "kernels/kernels_impl.h"
#include "kernels/q8_x86.h"

namespace cpullm {
namespace {

struct Avx2V {
  static constexpr int W = 8;
  using Vec = __m256;
  static inline __m256i lane_mask(int n) { return mask256(n); }
  static inline Vec zero() { return _mm256_setzero_ps(); }
  static inline Vec set1(float a) { return _mm256_set1_ps(a); }
  static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static inline Vec load_partial(const float* p, int n) { return _mm256_maskload_ps(p, lane_mask(n)); }
  static inline Vec load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline Vec load_bf16_partial(const uint16_t* p, int n) {
    alignas(16) uint16_t buf[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) buf[i] = p[i];
    return load_bf16(buf);
  }
  static inline Vec load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a); }
  static inline void store_partial(float* p, Vec a, int n) { _mm256_maskstore_ps(p, lane_mask(n), a); }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  static inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static inline Vec round_nearest(Vec a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n built in the exponent bits, in two halves so that n = 128 (x near the upper clamp) does
  // not overflow the exponent field.
  static inline Vec scale_pow2(Vec p, Vec n) {
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  }
  static inline Vec exp(Vec x) { return exp_approx<Avx2V>(x); }
  static inline float reduce(Vec a) { return hsum256(a); }
};

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<Avx2V>::table("avx2");
    k.matmul_q8 = &Q8Impl<Q8Avx2>::matmul_q8;
    k.quantize_q8 = &quantize_row_q8;
    k.q8_peak_loop = &Q8Impl<Q8Avx2>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
