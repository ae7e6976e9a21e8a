// The AArch64 vocabularies: NeonV for KernelsImpl (kernels_impl.h) and Q8Neon for Q8Impl (q8_impl.h),
// both 8 lanes wide as pairs of 128-bit registers: with 32 of them, the generic kernels get the same
// register budget (KernelsImpl::kAccRegs) as AVX2's 16 x 256 bits, and a 16-row int8 block is two I.
// Included only by the AArch64 kernel files; everything is in an anonymous namespace so no definition is
// shared across files built with different -march flags.
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels/kernels_impl.h"
#include "kernels/q8_impl.h"

namespace cpullm {
namespace {

// min / max are vminq / vmaxq, which return NaN when either operand is NaN (x86's minps / maxps return
// their second operand): a NaN reaching exp or the softmax stays NaN here, as on the portable path.
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
  static inline void store_f16(uint16_t* p, Vec v) {  // float_to_half's saturation and NaN: one at a time
    float lanes[W];
    store(lanes, v);
    for (int i = 0; i < W; ++i) p[i] = float_to_half(lanes[i]).bits;
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


// Without the dot-product extension (Armv8.0: Cortex-A72 / A53, the first Graviton): the products of
// 8 byte pairs widen to int16 (smull), adjacent pairs add (addp), and pairs of those accumulate into
// int32 (sadalp), so lane i gains bytes 4i..4i+3 as vpdpbusd's would. |x|, |w| <= 127, so a pair of
// products (<= 32,258) fits int16. Weights are taken signed: the stored w + 128 with its top bit flipped.
struct Q8Neon {
  struct I {
    int32x4_t a, b;
  };
  using F = NeonV::Vec;
  static inline I izero() { return {vdupq_n_s32(0), vdupq_n_s32(0)}; }
  static inline F fzero() { return NeonV::zero(); }
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
  static inline I shl(I i, int32_t count) { return {vshlq_s32(i.a, vdupq_n_s32(count)), vshlq_s32(i.b, vdupq_n_s32(count))}; }
  static inline F fload(const float* p) { return NeonV::load(p); }
  static inline void fstore(float* p, F f) { NeonV::store(p, f); }
  static inline void fstore_partial(float* p, F f, int n) { NeonV::store_partial(p, f, n); }
  static inline F fmul(F f, float s) { return {vmulq_n_f32(f.a, s), vmulq_n_f32(f.b, s)}; }
  static inline F fma_scaled(F f, I i, F s) {
    return {vfmaq_f32(f.a, vcvtq_f32_s32(i.a), s.a), vfmaq_f32(f.b, vcvtq_f32_s32(i.b), s.b)};
  }
  static inline F fma_scaled(F f, I i, float s) { return fma_scaled(f, i, NeonV::set1(s)); }
  static inline float reduce(F f) { return NeonV::reduce(f); }
};

}  // namespace
}  // namespace cpullm
