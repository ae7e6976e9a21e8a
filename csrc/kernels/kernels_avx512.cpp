// AVX-512 (F, BW, VL, DQ) path: Skylake-SP and later, Zen 4. Masked loads make the tails free.
#include <immintrin.h>

#include "kernels/avx512_vocab.h"
#include "kernels/q8_x86.h"

namespace cpullm {
namespace {

// quantize_row_q8 sixteen lanes at a time, with the same operations in the same order (the product with
// the reciprocal, the clamp, round-half-even, then the remainder as a separate multiply and subtract),
// so the digits are bit-identical to the portable version's.
void quantize_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales, int32_t* sums,
                 bool one_digit) {
  int8_t* hi = q;
  int8_t* lo = q + stride;
  for (int64_t k = K; k < stride; ++k) hi[k] = lo[k] = 0;
  if (one_digit) std::memset(lo, 0, size_t(K));
  const __m512 lim = _mm512_set1_ps(127.f), neg_lim = _mm512_set1_ps(-127.f);
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t G = (K + group - 1) / group;
  const int max_shift = q8_fast_max_shift(group);
  float row_scale = 0.f;
  if (one_digit) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const int n = K - k < 16 ? static_cast<int>(K - k) : 16;
      vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(Avx512V::lane_mask(n), x + k)), vmax);
    }
    row_scale = _mm512_reduce_max_ps(vmax) / 127.f;
  }
  // The groups' scales and reciprocals, 16 groups at a time as vector divisions (each correctly
  // rounded, so the same floats as one group at a time): four dependent scalar divisions per group were
  // about half of the quantizer's time.
  alignas(64) float amax[16], scale_of[16], fine_of[16], inv_of[16], inv_fine_of[16];
  for (int64_t g = 0; g < G; ++g) {
    const int64_t begin = g * group, end = begin + group < K ? begin + group : K;
    const int j = static_cast<int>(g % 16);
    if (j == 0) {
      const int64_t batch = G - g < 16 ? G - g : 16;
      for (int i = 0; i < 16; ++i) {
        __m512 vmax = _mm512_setzero_ps();
        const int64_t b0 = (g + i) * group, b1 = b0 + group < K ? b0 + group : K;
        for (int64_t k = b0; i < batch && k < b1; k += 16) {
          const int n = b1 - k < 16 ? static_cast<int>(b1 - k) : 16;
          // vmaxps returns its second operand when one is NaN: a NaN never becomes the maximum, as in
          // the portable loop.
          vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(Avx512V::lane_mask(n), x + k)), vmax);
        }
        amax[i] = _mm512_reduce_max_ps(vmax);
      }
      const __m512 a = _mm512_load_ps(amax), d = _mm512_set1_ps(127.f), one = _mm512_set1_ps(1.f);
      _mm512_store_ps(scale_of, _mm512_div_ps(a, d));
      if (one_digit)
        for (int i = 0; i < 16; ++i) scale_of[i] = q8_fast_scale(row_scale, scale_of[i], max_shift);
      const __m512 sc = _mm512_load_ps(scale_of), fi = _mm512_div_ps(sc, d);
      _mm512_store_ps(fine_of, fi);
      _mm512_store_ps(inv_of, _mm512_div_ps(one, sc));     // inf where the scale is 0: not used
      _mm512_store_ps(inv_fine_of, _mm512_div_ps(one, fi));
    }
    const float scale = scale_of[j], fine = fine_of[j];
    scales[g] = fine;
    if (!(fine >= 1.17549435e-38f)) {  // as the portable version: zero, or a fine step below FLT_MIN
      for (int64_t k = begin; k < end; ++k) hi[k] = lo[k] = 0;
      sums[g] = 0;
      continue;
    }
    const __m512 vs = _mm512_set1_ps(scale), vinv = _mm512_set1_ps(inv_of[j]), vinv_fine = _mm512_set1_ps(inv_fine_of[j]);
    __m512i sum_hi = _mm512_setzero_si512(), sum_lo = _mm512_setzero_si512();
    for (int64_t k = begin; k < end; k += 16) {
      const int n = end - k < 16 ? static_cast<int>(end - k) : 16;
      const __mmask16 m = Avx512V::lane_mask(n);
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
      const __m512 h = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(xv, vinv), neg_lim), lim), kRound);
      const __m512i hi32 = _mm512_cvtps_epi32(h);
      _mm512_mask_cvtepi32_storeu_epi8(hi + k, m, hi32);
      // Masked-off lanes are left out: loaded as 0 they give 0 digits, except with an infinite scale,
      // where 0 - 0 * inf is NaN and its lo digit -127.
      sum_hi = _mm512_mask_add_epi32(sum_hi, m, sum_hi, hi32);
      if (one_digit) continue;
      const __m512 rest = _mm512_sub_ps(xv, _mm512_mul_ps(h, vs));
      const __m512 l = _mm512_roundscale_ps(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(rest, vinv_fine), neg_lim), lim), kRound);
      const __m512i lo32 = _mm512_cvtps_epi32(l);
      _mm512_mask_cvtepi32_storeu_epi8(lo + k, m, lo32);
      sum_lo = _mm512_mask_add_epi32(sum_lo, m, sum_lo, lo32);
    }
    sums[g] = 128 * (127 * _mm512_reduce_add_epi32(sum_hi) + _mm512_reduce_add_epi32(sum_lo));
  }
}

}  // namespace

const Kernels& kernels_avx512() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<Avx512V>::table("avx512");
    // Without VNNI the int8 products are AVX2's (256-bit), and so is the wide layout's quantizer.
    set_matmul_q8(k, &matmul_q8_wide, kernels_avx2().quantize_q8_wide);
    k.quantize_q8 = &quantize_q8;
    k.q8_peak_loop = &Q8Impl<Q8Avx2>::peak_loop;
    return k;
  }();
  return table;
}

void matmul_f32_avx512_ahead(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                             int64_t ldy) {
  KernelsImpl<Avx512V>::matmul_f32_ahead(x, T, K, w, n0, n1, y, ldy);
}

void matmul_bf16_avx512_ahead(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                              float* y, int64_t ldy) {
  KernelsImpl<Avx512V>::matmul_bf16_ahead(x, T, K, w, n0, n1, y, ldy);
}

}  // namespace cpullm
