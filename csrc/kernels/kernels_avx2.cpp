// AVX2 + FMA path (Haswell and later, Zen). Compiled with -mavx2 -mfma; only called after dispatch
// has checked the CPU.
#include <immintrin.h>

#include <cmath>
#include <cstring>

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
  // As Avx512V::store_f16: F16C's nearest even after float_to_half's saturation, and its one NaN.
  static inline void store_f16(uint16_t* p, Vec v) {
    const __m128i h = _mm256_cvtps_ph(_mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(65504.f)), _mm256_set1_ps(-65504.f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i nan32 = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(0x7e00));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m128i nan = _mm_packus_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
    const __m128i mask = _mm_packs_epi32(_mm256_castsi256_si128(is_nan), _mm256_extracti128_si256(is_nan, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(h, nan, mask));
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

// quantize_row_q8 eight lanes at a time, with the same operations in the same order as the portable
// version (the product with the reciprocal, the clamp, round-half-even, the remainder as a separate
// multiply and subtract), so the digits are bit-identical; a group's tail goes through masked loads.
// kWide: the two digits stored as one int16 127 * hi + lo (Kernels::quantize_q8_wide's layout).
template <bool kWide>
void quantize_digits(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                     int32_t* sums, bool one_digit) {
  int8_t* hi = q;
  int8_t* lo = q + stride;
  int16_t* wide = reinterpret_cast<int16_t*>(q);
  if (kWide) {
    std::memset(wide + K, 0, sizeof(int16_t) * size_t(stride - K));
  } else {
    for (int64_t k = K; k < stride; ++k) hi[k] = lo[k] = 0;
    if (one_digit) std::memset(lo, 0, size_t(K));
  }
  const __m256 lim = _mm256_set1_ps(127.f), neg_lim = _mm256_set1_ps(-127.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const auto narrow = [](__m256i v, int8_t* out, int n) {  // 8 int32 in [-127, 127] -> n bytes
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    alignas(16) int8_t bytes[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm_packs_epi16(w16, w16));
    if (n == 8)
      std::memcpy(out, bytes, 8);
    else
      for (int i = 0; i < n; ++i) out[i] = bytes[i];
  };
  const bool fast = one_digit && !kWide;
  const int max_shift = q8_fast_max_shift(group);
  const float row_scale = fast ? q8_row_absmax(x, K) / 127.f : 0.f;
  for (int64_t begin = 0, g = 0; begin < K; begin += group, ++g) {
    const int64_t end = begin + group < K ? begin + group : K;
    // max(|x|, running): vmaxps returns its second operand when one is NaN, so, as in the portable
    // loop, a NaN never becomes the maximum.
    __m256 vmax = _mm256_setzero_ps();
    for (int64_t k = begin; k < end; k += 8) {
      const int n = end - k < 8 ? static_cast<int>(end - k) : 8;
      const __m256 xv = n == 8 ? _mm256_loadu_ps(x + k) : _mm256_maskload_ps(x + k, mask256(n));
      vmax = _mm256_max_ps(_mm256_andnot_ps(sign, xv), vmax);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float scale = fast ? q8_fast_scale(row_scale, amax / 127.f, max_shift) : amax / 127.f;
    const float fine = scale / 127.f;
    scales[g] = fine;
    if (!(fine >= 1.17549435e-38f)) {  // as the portable version: zero, or a fine step below FLT_MIN
      if (kWide)
        std::memset(wide + begin, 0, sizeof(int16_t) * size_t(end - begin));
      else
        for (int64_t k = begin; k < end; ++k) hi[k] = lo[k] = 0;
      sums[g] = 0;
      continue;
    }
    const __m256 vs = _mm256_set1_ps(scale), vinv = _mm256_set1_ps(1.f / scale), vinv_fine = _mm256_set1_ps(1.f / fine);
    __m256i sum_hi = _mm256_setzero_si256(), sum_lo = _mm256_setzero_si256();
    for (int64_t k = begin; k < end; k += 8) {
      const int n = end - k < 8 ? static_cast<int>(end - k) : 8;
      const __m256 xv = n == 8 ? _mm256_loadu_ps(x + k) : _mm256_maskload_ps(x + k, mask256(n));
      const __m256 h = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(xv, vinv), neg_lim), lim), kRound);
      const __m256i hi32 = _mm256_cvtps_epi32(h);
      if (!kWide) narrow(hi32, hi + k, n);
      // Masked-off lanes are left out: loaded as 0 they give 0 digits, except with an infinite scale,
      // where 0 - 0 * inf is NaN and its lo digit -127.
      const __m256i in_group = mask256(n);
      sum_hi = _mm256_add_epi32(sum_hi, _mm256_and_si256(hi32, in_group));
      if (!kWide && one_digit) continue;
      const __m256 rest = _mm256_sub_ps(xv, _mm256_mul_ps(h, vs));
      const __m256 l = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(rest, vinv_fine), neg_lim), lim), kRound);
      const __m256i lo32 = _mm256_cvtps_epi32(l);
      if (kWide) {
        const __m256i v = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(hi32, 7), hi32), lo32);
        const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        if (n == 8) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(wide + k), v16);
        } else {
          alignas(16) int16_t values[8];
          _mm_store_si128(reinterpret_cast<__m128i*>(values), v16);
          std::memcpy(wide + k, values, sizeof(int16_t) * size_t(n));
        }
      } else {
        narrow(lo32, lo + k, n);
      }
      sum_lo = _mm256_add_epi32(sum_lo, _mm256_and_si256(lo32, in_group));
    }
    const __m128i sh = _mm_add_epi32(_mm256_castsi256_si128(sum_hi), _mm256_extracti128_si256(sum_hi, 1));
    const __m128i sl = _mm_add_epi32(_mm256_castsi256_si128(sum_lo), _mm256_extracti128_si256(sum_lo, 1));
    alignas(16) int32_t th[4], tl[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(th), sh);
    _mm_store_si128(reinterpret_cast<__m128i*>(tl), sl);
    sums[g] = 128 * (127 * (th[0] + th[1] + th[2] + th[3]) + (tl[0] + tl[1] + tl[2] + tl[3]));
  }
}

void quantize_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales, int32_t* sums,
                 bool one_digit) {
  quantize_digits<false>(x, K, group, stride, q, scales, sums, one_digit);
}

void quantize_q8_wide(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                      int32_t* sums) {
  quantize_digits<true>(x, K, group, stride, q, scales, sums, false);
}

}  // namespace

const Kernels& kernels_avx2() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<Avx2V>::table("avx2");
    set_matmul_q8(k, &matmul_q8_wide, &quantize_q8_wide);
    k.quantize_q8 = &quantize_q8;
    k.q8_peak_loop = &Q8Impl<Q8Avx2>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
