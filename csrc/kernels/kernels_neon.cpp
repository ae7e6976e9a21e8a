// AArch64 Advanced SIMD path (every 64-bit Arm CPU: Apple M-series, Graviton, Ampere, Cortex-A).
// Built for the baseline ISA; the int8 matmul here widens products through int16 (q8_neon.h), and
// kernels_neondot.cpp / kernels_neoni8mm.cpp replace it with sdot / usdot where the CPU has them. Not
// timed on Arm hardware yet; tested under qemu-aarch64 (tools/arm_check.sh).
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "kernels/kernels_impl.h"
#include "kernels/q8_neon.h"

namespace cpullm {
namespace {

// quantize_row_q8 with the same operations in the same order as the portable version (the product
// with the reciprocal, the clamp that sends NaN to -127, round-half-even, the remainder as a separate
// multiply and subtract), so the digits are bit-identical; 8 values at a time, a group's tail through a
// zero-padded copy whose padding is left out of the sums.
inline float32x4_t clamp127(float32x4_t v) {
  const float32x4_t lim = vdupq_n_f32(127.f), neg_lim = vdupq_n_f32(-127.f);
  v = vbslq_f32(vcgtq_f32(v, neg_lim), v, neg_lim);  // !(v > -127) -> -127, NaN included
  return vbslq_f32(vcgtq_f32(v, lim), lim, v);
}

// One run of 8 values: their digits as bytes, and as int32 lanes (0-3, 4-7) for the group's sums.
struct Digits8 {
  int8x8_t hi, lo;
  int32x4_t h[2], l[2];
};

// kLo false (one-digit rows): the lo digits are left zero, not computed.
template <bool kLo>
inline Digits8 digits8(const float* x, float32x4_t vs, float32x4_t vinv, float32x4_t vinv_fine) {
  Digits8 d;
  for (int i = 0; i < 2; ++i) {
    const float32x4_t xv = vld1q_f32(x + 4 * i);
    const float32x4_t h = vrndnq_f32(clamp127(vmulq_f32(xv, vinv)));
    d.h[i] = vcvtq_s32_f32(h);
    if constexpr (kLo) {
      const float32x4_t rest = vsubq_f32(xv, vmulq_f32(h, vs));
      d.l[i] = vcvtq_s32_f32(vrndnq_f32(clamp127(vmulq_f32(rest, vinv_fine))));
    } else {
      d.l[i] = vdupq_n_s32(0);
    }
  }
  d.hi = vmovn_s16(vcombine_s16(vmovn_s32(d.h[0]), vmovn_s32(d.h[1])));
  d.lo = vmovn_s16(vcombine_s16(vmovn_s32(d.l[0]), vmovn_s32(d.l[1])));
  return d;
}

// All ones in lanes first + i < n, zero elsewhere.
inline int32x4_t lanes_below(int n, int first) {
  const int32_t lanes[4] = {0, 1, 2, 3};
  return vreinterpretq_s32_u32(vcltq_s32(vaddq_s32(vld1q_s32(lanes), vdupq_n_s32(first)), vdupq_n_s32(n)));
}

void quantize_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales, int32_t* sums,
                 bool one_digit) {
  int8_t* hi = q;
  int8_t* lo = q + stride;
  for (int64_t k = K; k < stride; ++k) hi[k] = lo[k] = 0;
  if (one_digit) std::memset(lo, 0, size_t(K));
  const int max_shift = q8_fast_max_shift(group);
  const float row_scale = one_digit ? q8_row_absmax(x, K) / 127.f : 0.f;
  for (int64_t begin = 0, g = 0; begin < K; begin += group, ++g) {
    const int64_t end = begin + group < K ? begin + group : K;
    // max(|x|, running) as the portable loop's a > amax ? a : amax, so a NaN never becomes the maximum
    // (vmaxq would return it).
    float32x4_t vmax = vdupq_n_f32(0.f);
    int64_t k = begin;
    for (; k + 4 <= end; k += 4) {
      const float32x4_t a = vabsq_f32(vld1q_f32(x + k));
      vmax = vbslq_f32(vcgtq_f32(a, vmax), a, vmax);
    }
    float amax = vmaxvq_f32(vmax);
    for (; k < end; ++k) {
      const float a = std::fabs(x[k]);
      amax = a > amax ? a : amax;
    }
    const float scale = one_digit ? q8_fast_scale(row_scale, amax / 127.f, max_shift) : amax / 127.f;
    const float fine = scale / 127.f;
    scales[g] = fine;
    if (!(fine >= 1.17549435e-38f)) {  // as the portable version: zero, or a fine step below FLT_MIN
      for (k = begin; k < end; ++k) hi[k] = lo[k] = 0;
      sums[g] = 0;
      continue;
    }
    const float32x4_t vs = vdupq_n_f32(scale), vinv = vdupq_n_f32(1.f / scale), vinv_fine = vdupq_n_f32(1.f / fine);
    int32x4_t sum_hi = vdupq_n_s32(0), sum_lo = vdupq_n_s32(0);
    for (k = begin; k < end; k += 8) {
      const int n = end - k < 8 ? static_cast<int>(end - k) : 8;
      float padded[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      const float* src = x + k;
      if (n < 8) {
        std::memcpy(padded, src, n * sizeof(float));
        src = padded;
      }
      const Digits8 d = one_digit ? digits8<false>(src, vs, vinv, vinv_fine) : digits8<true>(src, vs, vinv, vinv_fine);
      if (n == 8) {
        vst1_s8(hi + k, d.hi);
        if (!one_digit) vst1_s8(lo + k, d.lo);
      } else {
        int8_t hb[8], lb[8];
        vst1_s8(hb, d.hi);
        vst1_s8(lb, d.lo);
        std::memcpy(hi + k, hb, n);
        if (!one_digit) std::memcpy(lo + k, lb, n);
      }
      // The padding is left out of the sums: its zeros give zero digits, except with an infinite scale,
      // where 0 - 0 * inf is NaN and its lo digit -127 (as in the x86 versions).
      const int32x4_t in0 = lanes_below(n, 0), in1 = lanes_below(n, 4);
      sum_hi = vaddq_s32(sum_hi, vaddq_s32(vandq_s32(d.h[0], in0), vandq_s32(d.h[1], in1)));
      if (!one_digit) sum_lo = vaddq_s32(sum_lo, vaddq_s32(vandq_s32(d.l[0], in0), vandq_s32(d.l[1], in1)));
    }
    sums[g] = 128 * (127 * vaddvq_s32(sum_hi) + vaddvq_s32(sum_lo));
  }
}

}  // namespace

const Kernels& kernels_neon() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<NeonV>::table("neon");
    set_matmul_q8(k, &Q8Impl<Q8Neon>::matmul_q8);
    k.quantize_q8 = &quantize_q8;
    k.q8_peak_loop = &Q8Impl<Q8Neon>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
