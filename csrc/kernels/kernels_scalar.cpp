// The portable path: plain C++ over 8-lane arrays. It is the reference twin of every SIMD path and
// the path on CPUs we have no intrinsics for (the compiler may still auto-vectorise it).
#include <cmath>
#include <cstring>

#include "kernels/kernels_impl.h"
#include "kernels/q8_impl.h"

namespace cpullm {
namespace {

struct ScalarV {
  static constexpr int W = 8;
  struct Vec {
    float v[W];
  };
  static inline Vec zero() {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = 0.f;
    return r;
  }
  static inline Vec set1(float a) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = a;
    return r;
  }
  static inline Vec load(const float* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static inline Vec load_partial(const float* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  static inline float bf16_to_f32(uint16_t b) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline Vec load_bf16(const uint16_t* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static inline Vec load_bf16_partial(const uint16_t* p, int n) {
    Vec r = zero();
    for (int i = 0; i < n; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static inline Vec load_f16(const uint16_t* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = half_to_float(Half{p[i]});
    return r;
  }
  static inline void store(float* p, Vec a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static inline void store_f16(uint16_t* p, Vec a) {
    for (int i = 0; i < W; ++i) p[i] = float_to_half(a.v[i]).bits;
  }
  static inline void store_partial(float* p, Vec a, int n) {
    for (int i = 0; i < n; ++i) p[i] = a.v[i];
  }
  static inline Vec fmadd(Vec a, Vec b, Vec c) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static inline Vec add(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static inline Vec sub(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] -= b.v[i];
    return a;
  }
  static inline Vec mul(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static inline Vec div(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] /= b.v[i];
    return a;
  }
  static inline Vec min(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] = b.v[i] < a.v[i] ? b.v[i] : a.v[i];
    return a;
  }
  static inline Vec max(Vec a, Vec b) {
    for (int i = 0; i < W; ++i) a.v[i] = b.v[i] > a.v[i] ? b.v[i] : a.v[i];
    return a;
  }
  static inline Vec exp(Vec a) {
    for (int i = 0; i < W; ++i) a.v[i] = std::exp(a.v[i]);
    return a;
  }
  static inline float reduce(Vec a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
};

// Lane i sums the products of bytes 4i..4i+3, exactly as the SIMD forms do.
struct ScalarQ {
  struct I {
    int32_t v[8];
  };
  using F = ScalarV::Vec;
  static inline I izero() {
    I r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0;
    return r;
  }
  static inline F fzero() { return ScalarV::zero(); }
  // I doubles as 32 bytes here: the vocabulary passes loaded blocks around as I.
  static inline I load(const int8_t* p) {
    I r;
    std::memcpy(r.v, p, kQ8Block);
    return r;
  }
  static inline I flip(I v) {
    uint8_t b[kQ8Block];
    std::memcpy(b, v.v, kQ8Block);
    for (int i = 0; i < kQ8Block; ++i) b[i] ^= 0x80;
    std::memcpy(v.v, b, kQ8Block);
    return v;
  }
  static inline I weights(const uint8_t* p) { return flip(load(reinterpret_cast<const int8_t*>(p))); }
  static inline I seed(int32_t) { return izero(); }
  static inline I bcast4(const int8_t* p) {
    I r;
    for (int i = 0; i < 8; ++i) std::memcpy(&r.v[i], p, 4);
    return r;
  }
  static inline I dot(I acc, I x, I w) {
    int8_t xb[kQ8Block], wb[kQ8Block];
    std::memcpy(xb, x.v, kQ8Block);
    std::memcpy(wb, w.v, kQ8Block);
    for (int i = 0; i < 8; ++i) {
      int32_t s = 0;
      for (int j = 0; j < 4; ++j) s += int32_t(xb[4 * i + j]) * int32_t(wb[4 * i + j]);
      acc.v[i] += s;
    }
    return acc;
  }
  static inline I combine(I hi, I lo) {
    for (int l = 0; l < 8; ++l) hi.v[l] = 127 * hi.v[l] + lo.v[l];
    return hi;
  }
  // As unsigned: a negative signed left shift is undefined before C++20 (the result fits anyway).
  static inline I shl(I i, int32_t count) {
    for (int l = 0; l < 8; ++l) i.v[l] = static_cast<int32_t>(static_cast<uint32_t>(i.v[l]) << count);
    return i;
  }
  static inline F fload(const float* p) { return ScalarV::load(p); }
  static inline void fstore(float* p, F f) { ScalarV::store(p, f); }
  static inline void fstore_partial(float* p, F f, int n) { ScalarV::store_partial(p, f, n); }
  static inline F fmul(F f, float s) {
    for (int l = 0; l < 8; ++l) f.v[l] *= s;
    return f;
  }
  static inline F fma_scaled(F f, I i, F s) {
    for (int l = 0; l < 8; ++l) f.v[l] += static_cast<float>(i.v[l]) * s.v[l];
    return f;
  }
  static inline F fma_scaled(F f, I i, float s) { return fma_scaled(f, i, ScalarV::set1(s)); }
  static inline float reduce(F f) { return ScalarV::reduce(f); }
};

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels table = [] {
    Kernels k = KernelsImpl<ScalarV>::table("scalar");
    set_matmul_q8(k, &Q8Impl<ScalarQ>::matmul_q8);
    k.quantize_q8 = &quantize_row_q8;
    k.q8_peak_loop = &Q8Impl<ScalarQ>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
