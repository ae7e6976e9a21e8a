// The last step of a two-digit row's group in the one-token int8 matmul, shared by the AVX512-VNNI
// kernel (vnni_one_token_blocks) and the AMX fast rows' conversion, which sums a prompt's last row
// (kernels_amx.cpp, LastRow): one definition, so the two give the same bits by construction. For files
// built with at least AVX-512F; in an anonymous namespace, so each translation unit has its own copy.
#pragma once
#include <immintrin.h>

namespace cpullm {
namespace {

// acc + (127 * hi + lo) * (weight_scales * act_scale) for 16 rows: hi and lo are the group's integer
// sums of the hi and lo digits (lo already holding the -128 * sum correction), joined in wrapping int32
// arithmetic, exact since the result fits.
inline __m512 add_two_digit_group(__m512i hi, __m512i lo, __m512 weight_scales, float act_scale, __m512 acc) {
  const __m512i isum = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(hi, 7), hi), lo);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(weight_scales, _mm512_set1_ps(act_scale)), acc);
}

}  // namespace
}  // namespace cpullm
