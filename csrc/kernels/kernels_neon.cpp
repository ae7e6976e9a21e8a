// AArch64 Advanced SIMD path (every 64-bit Arm CPU: Apple M-series, Graviton, Ampere, Cortex-A).
// Built for the baseline ISA; the int8 matmul here widens products through int16 (q8_neon.h), and
// kernels_neondot.cpp replaces it with sdot where the CPU has the dot-product extension. Not measured
// on Arm hardware yet: tested under qemu-aarch64 (tools/reference_cases.py, README "Arm").
//
// The float vocabulary is 8 lanes wide as a pair of 128-bit registers: with 32 of them, that leaves the
// generic kernels the same register budget (KernelsImpl::kAccRegs) as AVX2's 16 x 256 bits.
#include <arm_neon.h>

#include <cmath>
#include <cstring>

#include "kernels/kernels_impl.h"
#include "kernels/q8_neon.h"

namespace cpullm {
namespace {

struct NeonV {
  static constexpr int W = 8;
  struct Vec {
    float32x4_t a, b;
  };
  template <class Op>
  static inline Vec map2(Vec x, Vec y, Op op) {
    return {op(x.a, y.a), op(x.b, y.b)};
  }
  static inline Vec zero() { return set1(0.f); }
  static inline Vec set1(float a) { return {vdupq_n_f32(a), vdupq_n_f32(a)}; }
  static inline Vec load(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static inline Vec load_partial(const float* p, int n) {
    float lanes[W] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; ++i) lanes[i] = p[i];
    return load(lanes);
  }
  static inline Vec load_bf16(const uint16_t* p) {
    const uint16x8_t h = vld1q_u16(p);
    return {vreinterpretq_f32_u32(vshlq_n_u32(vmovl_u16(vget_low_u16(h)), 16)),
            vreinterpretq_f32_u32(vshlq_n_u32(vmovl_high_u16(h), 16))};
  }
  static inline Vec load_bf16_partial(const uint16_t* p, int n) {
    uint16_t bits[W] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < n; ++i) bits[i] = p[i];
    return load_bf16(bits);
  }
  static inline Vec load_f16(const uint16_t* p) {  // fcvtl: exact, subnormals included
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
    return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
  }
  static inline void store(float* p, Vec v) {
    vst1q_f32(p, v.a);
    vst1q_f32(p + 4, v.b);
  }
  static inline void store_partial(float* p, Vec v, int n) {
    float lanes[W];
    store(lanes, v);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
  }
  static inline Vec fmadd(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.a, a.a, b.a), vfmaq_f32(c.b, a.b, b.b)}; }
  static inline Vec add(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vaddq_f32(x, y); }); }
  static inline Vec sub(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vsubq_f32(x, y); }); }
  static inline Vec mul(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vmulq_f32(x, y); }); }
  static inline Vec div(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vdivq_f32(x, y); }); }
  static inline Vec min(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vminq_f32(x, y); }); }
  static inline Vec max(Vec a, Vec b) { return map2(a, b, [](float32x4_t x, float32x4_t y) { return vmaxq_f32(x, y); }); }
  static inline Vec round_nearest(Vec v) { return {vrndnq_f32(v.a), vrndnq_f32(v.b)}; }
  // p * 2^n in two halves of n, as the x86 vocabularies do, so that n = 128 does not overflow the
  // exponent field.
  static inline float32x4_t scale_pow2_4(float32x4_t p, float32x4_t n) {
    const int32x4_t ni = vcvtq_s32_f32(n);  // n is integral
    const int32x4_t h1 = vshrq_n_s32(ni, 1), h2 = vsubq_s32(ni, h1);
    const int32x4_t bias = vdupq_n_s32(127);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h1, bias), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h2, bias), 23));
    return vmulq_f32(vmulq_f32(p, s1), s2);
  }
  static inline Vec scale_pow2(Vec p, Vec n) { return {scale_pow2_4(p.a, n.a), scale_pow2_4(p.b, n.b)}; }
  static inline Vec exp(Vec x) { return exp_approx<NeonV>(x); }
  static inline float reduce(Vec v) { return vaddvq_f32(vaddq_f32(v.a, v.b)); }
};

// quantize_row_q8 with the same operations in the same order as the portable version (the product
// with the reciprocal, the clamp that sends NaN to -127, round-half-even, the remainder as a separate
// multiply and subtract), so the digits are bit-identical; 8 values at a time, a group's tail through a
// zero-padded copy (zeros give zero digits and add nothing to the sums).
inline float32x4_t clamp127(float32x4_t v) {
  const float32x4_t lim = vdupq_n_f32(127.f), neg_lim = vdupq_n_f32(-127.f);
  v = vbslq_f32(vcgtq_f32(v, neg_lim), v, neg_lim);  // !(v > -127) -> -127, NaN included
  return vbslq_f32(vcgtq_f32(v, lim), lim, v);
}

struct Digits8 {
  int8x8_t hi, lo;
  int32x4_t sum_hi, sum_lo;
};

inline Digits8 digits8(const float* x, float32x4_t vs, float32x4_t vinv, float32x4_t vinv_fine) {
  float32x4_t h[2], l[2];
  for (int i = 0; i < 2; ++i) {
    const float32x4_t xv = vld1q_f32(x + 4 * i);
    h[i] = vrndnq_f32(clamp127(vmulq_f32(xv, vinv)));
    const float32x4_t rest = vsubq_f32(xv, vmulq_f32(h[i], vs));
    l[i] = vrndnq_f32(clamp127(vmulq_f32(rest, vinv_fine)));
  }
  const int32x4_t h0 = vcvtq_s32_f32(h[0]), h1 = vcvtq_s32_f32(h[1]);
  const int32x4_t l0 = vcvtq_s32_f32(l[0]), l1 = vcvtq_s32_f32(l[1]);
  return {vmovn_s16(vcombine_s16(vmovn_s32(h0), vmovn_s32(h1))), vmovn_s16(vcombine_s16(vmovn_s32(l0), vmovn_s32(l1))),
          vaddq_s32(h0, h1), vaddq_s32(l0, l1)};
}

void quantize_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales, int32_t* sums) {
  int8_t* hi = q;
  int8_t* lo = q + stride;
  for (int64_t k = K; k < stride; ++k) hi[k] = lo[k] = 0;
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
    const float scale = amax / 127.f;
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
      const Digits8 d = digits8(src, vs, vinv, vinv_fine);
      if (n == 8) {
        vst1_s8(hi + k, d.hi);
        vst1_s8(lo + k, d.lo);
      } else {
        int8_t hb[8], lb[8];
        vst1_s8(hb, d.hi);
        vst1_s8(lb, d.lo);
        std::memcpy(hi + k, hb, n);
        std::memcpy(lo + k, lb, n);
      }
      sum_hi = vaddq_s32(sum_hi, d.sum_hi);
      sum_lo = vaddq_s32(sum_lo, d.sum_lo);
    }
    sums[g] = 128 * (127 * vaddvq_s32(sum_hi) + vaddvq_s32(sum_lo));
  }
}

}  // namespace

const Kernels& kernels_neon() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<NeonV>::table("neon");
    k.matmul_q8 = &Q8Impl<Q8Neon>::matmul_q8;
    k.quantize_q8 = &quantize_q8;
    k.q8_peak_loop = &Q8Impl<Q8Neon>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
