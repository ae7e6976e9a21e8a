// The portable path: plain C++ over 8-lane arrays. It is the reference twin of every SIMD path and
// the path on CPUs we have no intrinsics for (the compiler may still auto-vectorise it).
#include <cstring>

#include "kernels/kernels_impl.h"

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
  static inline void store(float* p, Vec a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static inline void store_partial(float* p, Vec a, int n) {
    for (int i = 0; i < n; ++i) p[i] = a.v[i];
  }
  static inline Vec fmadd(Vec a, Vec b, Vec c) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static inline float reduce(Vec a) {
    float s = 0.f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
};

}  // namespace

const Kernels& kernels_scalar() {
  static const Kernels table = KernelsImpl<ScalarV>::table("scalar");
  return table;
}

}  // namespace cpullm
