// AVX-512 (F, BW, VL, DQ) path: Skylake-SP and later, Zen 4. Masked loads make the tails free.
#include <immintrin.h>

#include "kernels/kernels_impl.h"
#include "kernels/q8_x86.h"

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
  static inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }
  static inline void store_partial(float* p, Vec a, int n) { _mm512_mask_storeu_ps(p, lane_mask(n), a); }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float reduce(Vec a) { return _mm512_reduce_add_ps(a); }
};

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<Avx512V>::table("avx512");
    k.matmul_q8 = &Q8Impl<Q8Avx2>::matmul_q8;
    k.q8_peak_loop = &Q8Impl<Q8Avx2>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
