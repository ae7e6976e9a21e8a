// The int8 matmul written once over a small vocabulary `Q` of 8-lane integer and float vectors:
//   Q::I / Q::F                       8 x int32 / 8 x float
//   Q::izero(), Q::fzero()
//   Q::load(p), Q::load_partial(p, n)   32 int8 (the partial form zero-fills lanes >= n)
//   Q::dot(acc, x, w)                 acc[i] += sum_{j < 4} x[4i + j] * w[4i + j]   (signed int8 both)
//   Q::combine(hi, lo)                127 * hi + lo   (lane-wise int32)
//   Q::fma_scaled(f, i, s)            f + float(i) * s
//   Q::reduce(f)                      sum of lanes
// Included inside an anonymous namespace by each ISA file (see kernels_impl.h for why).
#pragma once
#include <cstdint>

#include "kernels/kernels.h"

namespace cpullm {

// Runs a tile family over row blocks of kRowBlock rows (they stay in cache while every token tile passes
// over them), tiles of up to 4 tokens and Tiles::rows(TT) rows (then single rows for the remainder).
// Tiles::tile<TT, RR> computes TT tokens x RR rows; activations are [T, 2K] (hi, then lo digits, per token).
template <class Tiles, int64_t kRowBlock>
struct Q8Driver {
  template <int TT>
  static inline void rows(const int8_t* x, const float* xs, int64_t K, int64_t group, int64_t n_groups,
                          const int8_t* w, const float* ws, int64_t r0, int64_t r1, float* y, int64_t ldy) {
    constexpr int RR = Tiles::rows(TT);
    int64_t n = r0;
    for (; n + RR <= r1; n += RR)
      Tiles::template tile<TT, RR>(x, xs, K, group, n_groups, w + n * K, ws + n * n_groups, y + n, ldy);
    for (; n < r1; ++n)
      Tiles::template tile<TT, 1>(x, xs, K, group, n_groups, w + n * K, ws + n * n_groups, y + n, ldy);
  }

  static void matmul(const int8_t* x, const float* xs, int64_t T, int64_t K, int64_t group, const int8_t* w,
                     const float* ws, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    const int64_t n_groups = (K + group - 1) / group;
    for (int64_t rb = n0; rb < n1; rb += kRowBlock) {
      const int64_t re = rb + kRowBlock < n1 ? rb + kRowBlock : n1;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4)
        rows<4>(x + t * 2 * K, xs + t * n_groups, K, group, n_groups, w, ws, rb, re, y + t * ldy, ldy);
      const int8_t* xt = x + t * 2 * K;
      const float* xst = xs + t * n_groups;
      float* yt = y + t * ldy;
      switch (T - t) {
        case 3: rows<3>(xt, xst, K, group, n_groups, w, ws, rb, re, yt, ldy); break;
        case 2: rows<2>(xt, xst, K, group, n_groups, w, ws, rb, re, yt, ldy); break;
        case 1: rows<1>(xt, xst, K, group, n_groups, w, ws, rb, re, yt, ldy); break;
        default: break;
      }
    }
  }
};

template <class Q>
struct Q8Impl {
  using I = typename Q::I;
  using F = typename Q::F;

  // x points at token 0's hi digits; each token's row is 2K bytes (hi digits, then lo digits).
  template <int TT, int RR>
  static inline void tile(const int8_t* x, const float* xs, int64_t K, int64_t group, int64_t n_groups,
                          const int8_t* w, const float* ws, float* y, int64_t ldy) {
    F acc[TT][RR];
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) acc[t][r] = Q::fzero();
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t begin = g * group;
      const int64_t len = K - begin < group ? K - begin : group;
      I hi[TT][RR], lo[TT][RR];
      for (int t = 0; t < TT; ++t)
        for (int r = 0; r < RR; ++r) hi[t][r] = lo[t][r] = Q::izero();
      for (int64_t b = 0; b < len; b += kQ8Block) {
        const int n = len - b < kQ8Block ? static_cast<int>(len - b) : kQ8Block;
        I wv[RR];
        for (int r = 0; r < RR; ++r) {
          __builtin_prefetch(w + (RR + r) * K + begin + b);  // the next tile's rows (see kernels_avx512vnni.cpp)
          wv[r] = n == kQ8Block ? Q::load(w + r * K + begin + b) : Q::load_partial(w + r * K + begin + b, n);
        }
        for (int t = 0; t < TT; ++t) {
          const int8_t* xh = x + t * 2 * K + begin + b;
          const I xhv = n == kQ8Block ? Q::load(xh) : Q::load_partial(xh, n);
          const I xlv = n == kQ8Block ? Q::load(xh + K) : Q::load_partial(xh + K, n);
          for (int r = 0; r < RR; ++r) {
            hi[t][r] = Q::dot(hi[t][r], xhv, wv[r]);
            lo[t][r] = Q::dot(lo[t][r], xlv, wv[r]);
          }
        }
      }
      for (int t = 0; t < TT; ++t)
        for (int r = 0; r < RR; ++r)
          acc[t][r] = Q::fma_scaled(acc[t][r], Q::combine(hi[t][r], lo[t][r]),
                                    xs[t * n_groups + g] * ws[r * n_groups + g]);
    }
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) y[t * ldy + r] = Q::reduce(acc[t][r]);
  }

  static constexpr int rows(int tokens) { return tokens == 1 ? 4 : 2; }

  // The int8 dot-product rate with no memory traffic: 8 independent accumulator chains over
  // register-resident operands. Returns a checksum so the work cannot be optimised away; each
  // iteration is 8 * kQ8Block multiply-adds.
  static int64_t peak_loop(int64_t iterations) {
    alignas(64) int8_t bytes[2 * kQ8Block];
    for (int i = 0; i < 2 * kQ8Block; ++i) bytes[i] = static_cast<int8_t>((i * 37) % 255 - 127);
    const I x = Q::load(bytes), w = Q::load(bytes + kQ8Block);
    I acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = Q::izero();
    for (int64_t it = 0; it < iterations; ++it)
      for (int a = 0; a < 8; ++a) acc[a] = Q::dot(acc[a], x, w);
    F f = Q::fzero();
    for (int a = 0; a < 8; ++a) f = Q::fma_scaled(f, acc[a], 1.f);
    return static_cast<int64_t>(Q::reduce(f));
  }

  static void matmul_q8(const int8_t* x, const float* xs, int64_t T, int64_t K, int64_t group, const int8_t* w,
                        const float* ws, int64_t n0, int64_t n1, float* y, int64_t ldy) {
    Q8Driver<Q8Impl, 32>::matmul(x, xs, T, K, group, w, ws, n0, n1, y, ldy);
  }
};

}  // namespace cpullm
