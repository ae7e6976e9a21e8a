// AArch64 Advanced SIMD path (every 64-bit Arm CPU: Apple M-series, Graviton, Ampere, Cortex-A).
// Built for the baseline ISA; the int8 matmul here widens products through int16 (q8_neon.h), and
// kernels_neondot.cpp replaces it with sdot where the CPU has the dot-product extension.
//
// The float vocabulary is 8 lanes wide as a pair of 128-bit registers: with 32 of them, that leaves the
// generic kernels the same register budget (KernelsImpl::kAccRegs) as AVX2's 16 x 256 bits.
#include <arm_neon.h>

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

}  // namespace

const Kernels& kernels_neon() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<NeonV>::table("neon");
    k.matmul_q8 = &Q8Impl<Q8Neon>::matmul_q8;
    k.quantize_q8 = &quantize_row_q8;
    k.q8_peak_loop = &Q8Impl<Q8Neon>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
