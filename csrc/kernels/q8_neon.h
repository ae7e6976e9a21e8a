// 8-lane int8 vocabularies for Q8Impl on AArch64 (see q8_impl.h): a 16-row block is two of these, each
// a pair of 128-bit registers. Included only by the AArch64 kernel files; everything is in an anonymous
// namespace so no definition is shared across files built with different -march flags.
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels/q8_impl.h"

namespace cpullm {
namespace {

// Without the dot-product extension (Armv8.0: Cortex-A72 / A53, the first Graviton): the products of
// 8 byte pairs widen to int16 (smull), adjacent pairs add (addp), and pairs of those accumulate into
// int32 (sadalp), so lane i gains bytes 4i..4i+3 as vpdpbusd's would. |x|, |w| <= 127, so a pair of
// products (<= 32,258) fits int16. Weights are taken signed: the stored w + 128 with its top bit flipped.
struct Q8Neon {
  struct I {
    int32x4_t a, b;
  };
  struct F {
    float32x4_t a, b;
  };
  static inline I izero() { return {vdupq_n_s32(0), vdupq_n_s32(0)}; }
  static inline F fzero() { return {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}; }
  static inline I load(const int8_t* p) {
    return {vreinterpretq_s32_s8(vld1q_s8(p)), vreinterpretq_s32_s8(vld1q_s8(p + 16))};
  }
  static inline I weights(const uint8_t* p) {
    const uint8x16_t top = vdupq_n_u8(0x80);
    return {vreinterpretq_s32_u8(veorq_u8(vld1q_u8(p), top)), vreinterpretq_s32_u8(veorq_u8(vld1q_u8(p + 16), top))};
  }
  static inline I seed(int32_t) { return izero(); }
  static inline I bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return {vdupq_n_s32(v), vdupq_n_s32(v)};
  }
  static inline int32x4_t dot4(int32x4_t acc, int32x4_t x, int32x4_t w) {
    const int8x16_t xb = vreinterpretq_s8_s32(x), wb = vreinterpretq_s8_s32(w);
    const int16x8_t lo = vmull_s8(vget_low_s8(xb), vget_low_s8(wb));
    const int16x8_t hi = vmull_high_s8(xb, wb);
    return vpadalq_s16(acc, vpaddq_s16(lo, hi));
  }
  static inline I dot(I acc, I x, I w) { return {dot4(acc.a, x.a, w.a), dot4(acc.b, x.b, w.b)}; }
  // 127 * hi + lo, wrapping like the other paths (the result fits anyway).
  static inline I combine(I hi, I lo) { return {vmlaq_n_s32(lo.a, hi.a, 127), vmlaq_n_s32(lo.b, hi.b, 127)}; }
  static inline F fload(const float* p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
  static inline void fstore(float* p, F f) {
    vst1q_f32(p, f.a);
    vst1q_f32(p + 4, f.b);
  }
  static inline void fstore_partial(float* p, F f, int n) {
    float lanes[8];
    fstore(lanes, f);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
  }
  static inline F fmul(F f, float s) { return {vmulq_n_f32(f.a, s), vmulq_n_f32(f.b, s)}; }
  static inline F fma_scaled(F f, I i, F s) {
    return {vfmaq_f32(f.a, vcvtq_f32_s32(i.a), s.a), vfmaq_f32(f.b, vcvtq_f32_s32(i.b), s.b)};
  }
  static inline F fma_scaled(F f, I i, float s) { return fma_scaled(f, i, F{vdupq_n_f32(s), vdupq_n_f32(s)}); }
  static inline float reduce(F f) { return vaddvq_f32(vaddq_f32(f.a, f.b)); }
};

}  // namespace
}  // namespace cpullm
