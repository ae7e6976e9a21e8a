// The int8 matmul over packed weights (Q8Weights in kernels.h), written once over a small vocabulary
// `Q` of 8-lane integer and float vectors; a 16-row block is two vectors wide:
//   Q::I / Q::F                       8 x int32 (or 32 bytes) / 8 x float
//   Q::izero(), Q::fzero()
//   Q::load(p)                        32 bytes
//   Q::weights(p)                     the 32 stored weight bytes (w + 128) at p as dot's w operand
//   Q::seed(sum)                      the lo digits' starting sum, given the group's Q8Acts::sums
//   Q::bcast4(p)                      the 4 bytes at p in every lane
//   Q::dot(acc, x, w)                 acc[i] += sum_{j < 4} x[4i + j] * w[4i + j]   (x signed int8; w as
//                                     weights() made it: the signed weights, with seed() zero, or the
//                                     stored unsigned bytes, with seed() taking back 128 * sum(x))
//   Q::combine(hi, lo)                127 * hi + lo   (lane-wise int32)
//   Q::shl(i, n)                      i << n   (lane-wise int32, 0 <= n < 31, the result fits)
//   Q::fload(p), Q::fstore(p, f), Q::fstore_partial(p, f, n)
//   Q::fma_scaled(f, i, s)            f + float(i) * s      (s a float or an F)
//   Q::fmul(f, s)                     f * s (s a float)
//   Q::reduce(f)                      sum of lanes
// Included inside an anonymous namespace by each ISA file (see kernels_impl.h for why).
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/kernels.h"

namespace cpullm {

// Runs a tile family over the row blocks [b0, b1) in chunks small enough to stay in L2 while every
// token tile passes over them, with tiles of up to Tiles::kTokens tokens and Tiles::blocks(TT) row
// blocks (then single blocks for the remainder). The rows whose lo digits are zero (Q8Acts::
// one_digit_rows) go through OneDigitTiles, which may skip those digits; by default the same family.
//
// MixedTiles (optional): tiles of TT tokens whose last one has two digits and the others one, for TT
// from 2 to MixedTiles::kTokens. Fast prefill's usual rows are one-digit rows and one two-digit
// row after them (the logits returned); that row then rides in the one-digit rows' last tile instead of
// passing over the chunk alone as one token, which re-reads the chunk at one token's rate (the same
// integer sums and epilogue as any two-digit tile, so the same bits).
template <class Tiles, class OneDigitTiles = Tiles, class MixedTiles = void>
struct Q8Driver {
  static constexpr int64_t kPrefetchMinTokens = 8;

  // The next chunk's bytes [pos, end) of w.data, requested toward L2 a few lines after each tile of the
  // current chunk. The chunk's first token tile streams its blocks from memory at a fraction of the rate
  // the tiles consume them (about half, for one-digit rows on a Zen 4 core), and every later token tile
  // re-reads them from L2; spread over those later tiles, the next chunk's lines arrive in time.
  struct NextChunk {
    const uint8_t* base = nullptr;
    int64_t pos = 0, end = 0, per_tile = 0;
    inline void step() {
      for (int64_t i = 0; i < per_tile && pos < end; ++i, pos += 64) __builtin_prefetch(base + pos, 0, 2);
    }
  };

  template <class Family, int TT>
  static inline void blocks(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, int64_t b1, float* y,
                            int64_t ldy, NextChunk& next) {
    constexpr int RB = Family::blocks(TT);
    int64_t b = b0;
    for (; b + RB <= b1; b += RB) {
      Family::template tile<TT, RB>(x, t0, w, b, y, ldy);
      next.step();
    }
    for (; b < b1; ++b) {
      Family::template tile<TT, 1>(x, t0, w, b, y, ldy);
      next.step();
    }
  }

  // Tile calls of `tokens` over n_blocks blocks, counting a remainder of tokens as one token tile of
  // whole block tiles (its tiles may be narrower, so this is at most the count: the requests then end
  // early, never late).
  template <class Family>
  static constexpr int64_t tile_calls(int64_t n_tokens, int64_t n_blocks) {
    constexpr int TT = Family::kTokens;
    constexpr int RB = Family::blocks(TT);
    return (n_tokens + TT - 1) / TT * ((n_blocks + RB - 1) / RB);
  }

  // Tokens [t0, t1) over the row blocks [b0, b1).
  template <class Family>
  static inline void tokens(const Q8Acts& x, int64_t t0, int64_t t1, const Q8Weights& w, int64_t b0, int64_t b1,
                            float* y, int64_t ldy, NextChunk& next) {
    constexpr int TT = Family::kTokens;
    static_assert(TT >= 1 && TT <= 4, "the remainder below handles up to 3 tokens");
    int64_t t = t0;
    for (; t + TT <= t1; t += TT) blocks<Family, TT>(x, t, w, b0, b1, y, ldy, next);
    switch (t1 - t) {
      case 3: if constexpr (TT > 3) blocks<Family, 3>(x, t, w, b0, b1, y, ldy, next); break;
      case 2: if constexpr (TT > 2) blocks<Family, 2>(x, t, w, b0, b1, y, ldy, next); break;
      case 1: if constexpr (TT > 1) blocks<Family, 1>(x, t, w, b0, b1, y, ldy, next); break;
      default: break;
    }
  }

  // The mixed tile of n tokens from t (2 <= n <= TT).
  template <int TT>
  static inline void mixed(const Q8Acts& x, int64_t t, int64_t n, const Q8Weights& w, int64_t b0, int64_t b1, float* y,
                           int64_t ldy, NextChunk& next) {
    if constexpr (TT >= 2) {
      if (n == TT)
        blocks<MixedTiles, TT>(x, t, w, b0, b1, y, ldy, next);
      else
        mixed<TT - 1>(x, t, n, w, b0, b1, y, ldy, next);
    }
  }

  static void matmul(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
    constexpr int64_t RB = Tiles::blocks(Tiles::kTokens);
    int64_t chunk = (int64_t(256) << 10) / w.block_bytes / RB * RB;  // whole tiles
    if (chunk < RB) chunk = RB;
    constexpr bool kSplits = !std::is_same_v<Tiles, OneDigitTiles>;
    const int64_t split = kSplits ? std::max<int64_t>(0, std::min(x.one_digit_rows, x.T)) : 0;
    // With a mixed tile: the one-digit rows [0, split - mix) in whole tiles, then the rows [split - mix,
    // T) as one mixed tile of mix + 1 tokens (where the remainder is too many for it, no mixed tile).
    int64_t mix = 0;
    if constexpr (kSplits && !std::is_void_v<MixedTiles>) {
      constexpr int64_t TT1 = OneDigitTiles::kTokens, most = MixedTiles::kTokens - 1;
      const int64_t r = split % TT1 == 0 ? std::min(TT1, split) : split % TT1;
      if (split > 0 && x.T - split == 1 && r <= most) mix = r;
    }
    for (int64_t cb = b0; cb < b1; cb += chunk) {
      const int64_t ce = cb + chunk < b1 ? cb + chunk : b1;
      NextChunk next;
      // Only where the chunk has token tiles to spare: one token's pass reads its blocks from memory
      // as a single stream already (decode), and then the requests would only compete with it.
      if (x.T >= kPrefetchMinTokens && ce < b1) {
        next.base = w.data;
        next.pos = ce * w.block_bytes;
        next.end = std::min(b1, ce + chunk) * w.block_bytes;
        int64_t calls = tile_calls<OneDigitTiles>(split - mix, ce - cb);
        if constexpr (!std::is_void_v<MixedTiles>)
          if (mix > 0) calls += tile_calls<MixedTiles>(1, ce - cb);  // one token tile: the mixed one
        if (mix == 0) calls += tile_calls<Tiles>(x.T - split, ce - cb);
        next.per_tile = ((next.end - next.pos) / 64 + calls - 1) / calls;
      }
      if (mix > 0) {
        if constexpr (!std::is_void_v<MixedTiles>) {
          tokens<OneDigitTiles>(x, 0, split - mix, w, cb, ce, y, ldy, next);
          mixed<MixedTiles::kTokens>(x, split - mix, mix + 1, w, cb, ce, y, ldy, next);
        }
        continue;
      }
      if (split > 0) tokens<OneDigitTiles>(x, 0, split, w, cb, ce, y, ldy, next);
      tokens<Tiles>(x, split, x.T, w, cb, ce, y, ldy, next);
    }
  }
};

// kLo false: the tiles for rows whose lo digits are zero (Q8Acts::one_digit_rows), which skip them and
// take twice the tokens for the same accumulators. kMixed: Q8Driver's MixedTiles, whose last token
// alone has two digits: up to 3 one-digit rows before it, so at most the one-digit tile's 4 tokens
// (one pair of lo sums more). Checked for bits (tests, tools/arm_check.sh), not timed on Arm or AVX-VNNI.
template <class Q, bool kLo = true, bool kMixed = false>
struct Q8Impl {
  using I = typename Q::I;
  using F = typename Q::F;
  static constexpr int kTokens = kMixed ? 4 : kLo ? 2 : 4;
  // Whether token t of a tile of TT has lo digits to take.
  static constexpr bool has_lo(int t, int TT) { return kMixed ? t == TT - 1 : kLo; }
  // One block per tile: a token then reads a chunk of blocks front to back, one sequential stream for
  // the hardware prefetcher (see kernels_avx512vnni.cpp), and two tokens share each loaded block.
  static constexpr int blocks(int) { return 1; }

  // TT tokens (from t0) x RB row blocks (from b0).
  template <int TT, int RB>
  static inline void tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, float* y, int64_t ldy) {
    const int64_t G = w.n_groups;
    const uint8_t* blk[RB];
    for (int b = 0; b < RB; ++b) blk[b] = w.data + (b0 + b) * w.block_bytes;
    const int8_t* xt[TT];
    for (int t = 0; t < TT; ++t) xt[t] = x.q + (t0 + t) * 2 * x.stride;
    F acc[TT][RB][2];
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b) acc[t][b][0] = acc[t][b][1] = Q::fzero();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t quads = g + 1 == G ? w.last_quads : w.group / 4;
      const int64_t off = g * w.group_bytes, begin = g * w.group;
      I hi[TT][RB][2], lo[TT][RB][2];
      for (int t = 0; t < TT; ++t) {
        // A one-digit row's group sum is 128 * 127 * sum(hi): its hi sums take back 128 * sum(hi) alone
        // (vnni_tile's seed), so that they are the group's whole integer sum, which the epilogue shifts.
        const int32_t sum = x.sums[(t0 + t) * G + g];
        const I seed = Q::seed(has_lo(t, TT) ? sum : sum / 127);
        for (int b = 0; b < RB; ++b) {
          hi[t][b][0] = hi[t][b][1] = has_lo(t, TT) ? Q::izero() : seed;
          lo[t][b][0] = lo[t][b][1] = seed;
        }
      }
      for (int64_t i = 0; i < quads; ++i) {
        I wv[RB][2];
        for (int b = 0; b < RB; ++b) {
          const uint8_t* p = blk[b] + off + i * 64;
          // Several tokens: the next tile's blocks, requested early, since prefill re-reads a chunk of
          // blocks from L2 for every token tile and each block is a short stream. (The AVX512-VNNI
          // tiles measured this a cost on Zen 4 and dropped it; here it measured neither way.)
          if (TT > 1) __builtin_prefetch(p + RB * w.block_bytes);
          wv[b][0] = Q::weights(p);
          wv[b][1] = Q::weights(p + 32);
        }
        for (int t = 0; t < TT; ++t) {
          const I xh = Q::bcast4(xt[t] + begin + 4 * i);
          for (int b = 0; b < RB; ++b)
            for (int h = 0; h < 2; ++h) hi[t][b][h] = Q::dot(hi[t][b][h], xh, wv[b][h]);
          if (has_lo(t, TT)) {
            const I xl = Q::bcast4(xt[t] + x.stride + begin + 4 * i);
            for (int b = 0; b < RB; ++b)
              for (int h = 0; h < 2; ++h) lo[t][b][h] = Q::dot(lo[t][b][h], xl, wv[b][h]);
          }
        }
      }
      for (int b = 0; b < RB; ++b) {
        const float* ws = reinterpret_cast<const float*>(blk[b] + off + quads * 64);
        const F w0 = Q::fload(ws), w1 = Q::fload(ws + 8);
        for (int t = 0; t < TT; ++t) {
          if (has_lo(t, TT)) {
            const float s = x.scales[(t0 + t) * G + g];
            acc[t][b][0] = Q::fma_scaled(acc[t][b][0], Q::combine(hi[t][b][0], lo[t][b][0]), Q::fmul(w0, s));
            acc[t][b][1] = Q::fma_scaled(acc[t][b][1], Q::combine(hi[t][b][1], lo[t][b][1]), Q::fmul(w1, s));
          } else {
            // One-digit rows: the group's scale as a shift of its sum (Q8Acts::shifts), the row's unit
            // at the end, as vnni_tile does: one float multiply per group and 8 rows fewer.
            const int32_t d = x.shifts[(t0 + t) * G + g];
            acc[t][b][0] = Q::fma_scaled(acc[t][b][0], Q::shl(hi[t][b][0], d), w0);
            acc[t][b][1] = Q::fma_scaled(acc[t][b][1], Q::shl(hi[t][b][1], d), w1);
          }
        }
      }
    }
    for (int t = 0; t < TT; ++t)
      for (int b = 0; b < RB; ++b) {
        const int64_t row0 = (b0 + b) * kQ8Rows, rest = w.rows - row0;
        float* out = y + (t0 + t) * ldy + row0;
        if (!has_lo(t, TT)) {
          acc[t][b][0] = Q::fmul(acc[t][b][0], x.units[t0 + t]);
          acc[t][b][1] = Q::fmul(acc[t][b][1], x.units[t0 + t]);
        }
        if (rest >= kQ8Rows) {
          Q::fstore(out, acc[t][b][0]);
          Q::fstore(out + 8, acc[t][b][1]);
        } else {
          Q::fstore_partial(out, acc[t][b][0], rest < 8 ? static_cast<int>(rest) : 8);
          if (rest > 8) Q::fstore_partial(out + 8, acc[t][b][1], static_cast<int>(rest - 8));
        }
      }
  }

  // The int8 dot-product rate with no memory traffic: 8 independent accumulator chains over
  // register-resident operands. Returns a checksum so the work cannot be optimised away; each
  // iteration is 8 * kQ8Block multiply-adds.
  static int64_t peak_loop(int64_t iterations) {
    alignas(64) int8_t bytes[2 * kQ8Block];
    for (int i = 0; i < 2 * kQ8Block; ++i) bytes[i] = static_cast<int8_t>((i * 37) % 255 - 127);
    I x = Q::load(bytes), w = Q::load(bytes + kQ8Block);
    I acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = Q::izero();
    for (int64_t it = 0; it < iterations; ++it) {
      // The operands must look new each iteration: AVX2's dot is sign fix-ups and maddubs / madd of x
      // and w before its add, and the compiler would hoist all of that out of a loop over constants.
      asm volatile("" : "+m"(x), "+m"(w));
      for (int a = 0; a < 8; ++a) acc[a] = Q::dot(acc[a], x, w);
    }
    F f = Q::fzero();
    for (int a = 0; a < 8; ++a) f = Q::fma_scaled(f, acc[a], 1.f);
    return static_cast<int64_t>(Q::reduce(f));
  }

  static void matmul_q8(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
    Q8Driver<Q8Impl, Q8Impl<Q, false>, Q8Impl<Q, false, true>>::matmul(x, w, b0, b1, y, ldy);
  }
};

}  // namespace cpullm
