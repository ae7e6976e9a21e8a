// ISA-independent kernel bodies, written once over a small SIMD vocabulary `V`:
//   V::W                       lanes per vector
//   V::zero(), V::load(p), V::load_partial(p, n), V::store(p, v), V::store_partial(p, v, n)
//   V::load_bf16(p), V::load_bf16_partial(p, n)      (bf16 bits widened to f32 lanes)
//   V::set1(a), V::fmadd(a, b, c) = a * b + c, V::reduce(v) = sum of lanes
// Each kernels_<isa>.cpp defines its V in an anonymous namespace and instantiates KernelsImpl<V>, so
// the instantiations never merge across translation units built with different ISA flags. For the
// same reason nothing here calls into templates of the standard library.
#pragma once
#include <cstdint>

#include "kernels/kernels.h"

namespace cpullm {

template <class V>
struct KernelsImpl {
  using Vec = typename V::Vec;
  static constexpr int W = V::W;

  static inline Vec loadw(const float* p) { return V::load(p); }
  static inline Vec loadw(const uint16_t* p) { return V::load_bf16(p); }
  static inline Vec loadw_partial(const float* p, int n) { return V::load_partial(p, n); }
  static inline Vec loadw_partial(const uint16_t* p, int n) { return V::load_bf16_partial(p, n); }

  // TT tokens x RR rows of outputs held in registers: each weight vector loaded feeds TT FMAs and each
  // activation vector feeds RR.
  template <int TT, int RR, class WT>
  static inline void tile(const float* x, int64_t K, const WT* w, float* y, int64_t ldy) {
    Vec acc[TT][RR];
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) acc[t][r] = V::zero();
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      Vec wv[RR];
      for (int r = 0; r < RR; ++r) {
        // The next tile's rows, requested early (see kernels_avx512vnni.cpp): rows are short streams.
        __builtin_prefetch(w + (RR + r) * K + k);
        wv[r] = loadw(w + r * K + k);
      }
      for (int t = 0; t < TT; ++t) {
        const Vec xv = V::load(x + t * K + k);
        for (int r = 0; r < RR; ++r) acc[t][r] = V::fmadd(xv, wv[r], acc[t][r]);
      }
    }
    if (k < K) {
      const int rem = static_cast<int>(K - k);
      Vec wv[RR];
      for (int r = 0; r < RR; ++r) wv[r] = loadw_partial(w + r * K + k, rem);
      for (int t = 0; t < TT; ++t) {
        const Vec xv = V::load_partial(x + t * K + k, rem);
        for (int r = 0; r < RR; ++r) acc[t][r] = V::fmadd(xv, wv[r], acc[t][r]);
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) y[t * ldy + r] = V::reduce(acc[t][r]);
  }

  // All tokens against rows [r0, r1): a row block small enough to stay in cache while every token
  // tile passes over it.
  template <int TT, class WT>
  static inline void token_tile_rows(const float* x, int64_t K, const WT* w, int64_t r0, int64_t r1, float* y,
                                     int64_t ldy) {
    constexpr int RR = TT == 1 ? 4 : 2;
    int64_t n = r0;
    for (; n + RR <= r1; n += RR) tile<TT, RR>(x, K, w + n * K, y + n, ldy);
    for (; n < r1; ++n) tile<TT, 1>(x, K, w + n * K, y + n, ldy);
  }

  template <class WT>
  static void matmul(const float* x, int64_t T, int64_t K, const WT* w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
    constexpr int64_t kRowBlock = 16;  // 16 rows x K=4096 x 4 B = 256 KiB: within L2 on current cores.
    for (int64_t rb = n0; rb < n1; rb += kRowBlock) {
      const int64_t re = rb + kRowBlock < n1 ? rb + kRowBlock : n1;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) token_tile_rows<4>(x + t * K, K, w, rb, re, y + t * ldy, ldy);
      switch (T - t) {
        case 3: token_tile_rows<3>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        case 2: token_tile_rows<2>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        case 1: token_tile_rows<1>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        default: break;
      }
    }
  }

  static void matmul_f32(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                         int64_t ldy) {
    matmul(x, T, K, w, n0, n1, y, ldy);
  }
  static void matmul_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                          float* y, int64_t ldy) {
    matmul(x, T, K, w, n0, n1, y, ldy);
  }

  static float dot_f32(const float* a, const float* b, int64_t n) {
    Vec acc0 = V::zero(), acc1 = V::zero();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      acc0 = V::fmadd(V::load(a + i), V::load(b + i), acc0);
      acc1 = V::fmadd(V::load(a + i + W), V::load(b + i + W), acc1);
    }
    for (; i + W <= n; i += W) acc0 = V::fmadd(V::load(a + i), V::load(b + i), acc0);
    if (i < n) {
      const int rem = static_cast<int>(n - i);
      acc1 = V::fmadd(V::load_partial(a + i, rem), V::load_partial(b + i, rem), acc1);
    }
    return V::reduce(acc0) + V::reduce(acc1);
  }

  static void axpy_f32(float alpha, const float* x, float* y, int64_t n) {
    const Vec av = V::set1(alpha);
    int64_t i = 0;
    for (; i + W <= n; i += W) V::store(y + i, V::fmadd(av, V::load(x + i), V::load(y + i)));
    if (i < n) {
      const int rem = static_cast<int>(n - i);
      V::store_partial(y + i, V::fmadd(av, V::load_partial(x + i, rem), V::load_partial(y + i, rem)), rem);
    }
  }

  static Kernels table(const char* name) {
    Kernels k;
    k.name = name;
    k.matmul_f32 = &matmul_f32;
    k.matmul_bf16 = &matmul_bf16;
    k.dot_f32 = &dot_f32;
    k.axpy_f32 = &axpy_f32;
    return k;
  }
};

}  // namespace cpullm
