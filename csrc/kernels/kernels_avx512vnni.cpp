// AVX-512 with VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later). The f32/bf16 kernels are
// the AVX-512 ones; the int8 matmul is written for 512-bit registers here. Compiled with -mavx512vnni;
// only called after dispatch has checked the CPU.
//
// The int8 matmul reads the packed layout (Q8Weights in kernels.h): one 64-byte vector holds 4 inputs of
// 16 output rows, so each vpdpbusd advances 16 rows at once against one token's 4 activation bytes
// broadcast to every lane, and a tile of TT tokens x RB blocks needs no horizontal sums. vpdpbusd
// multiplies unsigned by signed bytes: the weights are stored as w + 128 (unsigned), and the 128 *
// sum(x) this adds is taken back by seeding the lo digits' sum with the group's precomputed
// -128 * (127 * sum(hi) + sum(lo)) (Q8Acts::sums), or for one-digit rows the hi digits' sum with
// -128 * sum(hi) (vnni_tile). Per group and tile the epilogue (join the digits, convert, scale) then runs
// once per 16 rows per token instead of once per row.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/q8_avx512.h"
#include "kernels/q8_x86.h"

namespace cpullm {
namespace {

// One token (decode, and a prefill's last odd token): a single block at a time, read front to back, so
// that a thread's chunk of blocks (which lie back to back) is one sequential stream: the hardware
// prefetcher then runs at the full read bandwidth. Tiles over several blocks read as many interleaved streams of a few KiB each, which the
// prefetcher meets cold at every tile; on a Zen 4 core that held one thread to ~17 GB/s of its 31, and
// software prefetching ahead in each stream only partly helped (measured 14-21 GB/s over distances and
// tile widths; one stream without software prefetch 31-38 GB/s). Even and odd quads feed separate
// accumulators so that two dependency chains per digit hide vpdpbusd's latency.
//
// kPrefetch: each quad pair also requests the line kPrefetchAhead bytes on, into L1 (and one token's
// matmul reads four streams, matmul_q8_avx512vnni_prefetching below). On an Intel Xeon with AMX (the
// amx table, which calls this for decode) the request took SmolLM2 int8 decode from 89-95 to
// 98-101 tok/s on 1 thread and from 158-164 to 181-203 on 2 (tools/ab_forward.py, 3 rounds; 1 KiB ahead
// fell behind on 2 threads, 8 KiB on 1). On Zen 4 (the 1B shape's int8 decode, 1 thread, 3-5 rounds) the
// requests cost it 12-20 % (21.6-22.0 -> 16.8-19.0 tok/s, with one stream or four), and four streams
// without them read no faster than one (19.6-23.5 against 19.8-22.0: this kernel's two chains per digit
// do not wait on latency as the f32 / bf16 rows did, kernels_impl.h), so its table keeps one stream.
constexpr int64_t kPrefetchAhead = 4096;
// Token t over the row blocks blocks[0 .. kBlocks), each summed as alone (the same bits): with more
// than one, decode reads as many streams of weights at once.
template <int kBlocks, bool kPrefetch>
inline void vnni_one_token_blocks(const Q8Acts& x, int64_t t, const Q8Weights& w, const int64_t* blocks, float* y,
                                  int64_t ldy) {
  const int64_t G = w.n_groups;
  const uint8_t* blk[kBlocks];
  for (int k = 0; k < kBlocks; ++k) blk[k] = w.data + blocks[k] * w.block_bytes;
  const int8_t* xh_row = x.q + t * 2 * x.stride;
  const int8_t* xl_row = xh_row + x.stride;
  const float* xs = x.scales + t * G;
  const int32_t* sums = x.sums + t * G;
  y += t * ldy;
  __m512 acc[kBlocks];
  for (int k = 0; k < kBlocks; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t quads = g + 1 == G ? w.last_quads : w.group / 4;
    const int8_t* xh = xh_row + g * w.group;
    const int8_t* xl = xl_row + g * w.group;
    const uint8_t* rec[kBlocks];
    __m512i hi0[kBlocks], hi1[kBlocks], lo0[kBlocks], lo1[kBlocks];
    for (int k = 0; k < kBlocks; ++k) {
      rec[k] = blk[k] + g * w.group_bytes;
      hi0[k] = hi1[k] = lo1[k] = _mm512_setzero_si512();
      lo0[k] = _mm512_set1_epi32(-sums[g]);
    }
    int64_t i = 0;
    for (; i + 2 <= quads; i += 2) {
      int32_t h0, h1, l0, l1;
      std::memcpy(&h0, xh + 4 * i, 4);
      std::memcpy(&h1, xh + 4 * i + 4, 4);
      std::memcpy(&l0, xl + 4 * i, 4);
      std::memcpy(&l1, xl + 4 * i + 4, 4);
      const __m512i bh0 = _mm512_set1_epi32(h0), bh1 = _mm512_set1_epi32(h1);
      const __m512i bl0 = _mm512_set1_epi32(l0), bl1 = _mm512_set1_epi32(l1);
      for (int k = 0; k < kBlocks; ++k) {
        if constexpr (kPrefetch) {
          _mm_prefetch(reinterpret_cast<const char*>(rec[k] + i * 64 + kPrefetchAhead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(rec[k] + i * 64 + kPrefetchAhead + 64), _MM_HINT_T0);
        }
        const __m512i w0 = _mm512_loadu_si512(rec[k] + i * 64), w1 = _mm512_loadu_si512(rec[k] + i * 64 + 64);
        hi0[k] = _mm512_dpbusd_epi32(hi0[k], w0, bh0);
        lo0[k] = _mm512_dpbusd_epi32(lo0[k], w0, bl0);
        hi1[k] = _mm512_dpbusd_epi32(hi1[k], w1, bh1);
        lo1[k] = _mm512_dpbusd_epi32(lo1[k], w1, bl1);
      }
    }
    if (i < quads) {
      int32_t h0, l0;
      std::memcpy(&h0, xh + 4 * i, 4);
      std::memcpy(&l0, xl + 4 * i, 4);
      for (int k = 0; k < kBlocks; ++k) {
        const __m512i w0 = _mm512_loadu_si512(rec[k] + i * 64);
        hi0[k] = _mm512_dpbusd_epi32(hi0[k], w0, _mm512_set1_epi32(h0));
        lo0[k] = _mm512_dpbusd_epi32(lo0[k], w0, _mm512_set1_epi32(l0));
      }
    }
    for (int k = 0; k < kBlocks; ++k)
      acc[k] = add_two_digit_group(_mm512_add_epi32(hi0[k], hi1[k]), _mm512_add_epi32(lo0[k], lo1[k]),
                                   _mm512_loadu_ps(reinterpret_cast<const float*>(rec[k] + quads * 64)), xs[g], acc[k]);
  }
  for (int k = 0; k < kBlocks; ++k) {
    const int64_t row0 = blocks[k] * kQ8Rows, rest = w.rows - row0;
    if (rest >= kQ8Rows)
      _mm512_storeu_ps(y + row0, acc[k]);
    else
      _mm512_mask_storeu_ps(y + row0, static_cast<__mmask16>((1u << rest) - 1u), acc[k]);
  }
}

template <bool kPrefetch>
inline void vnni_one_token(const Q8Acts& x, int64_t t, const Q8Weights& w, int64_t b, float* y, int64_t ldy) {
  vnni_one_token_blocks<1, kPrefetch>(x, t, w, &b, y, ldy);
}

// Tokens t >= kLoFrom have their lo digits' products taken; the others are rows whose lo digits are
// zero (the same integers, half the vpdpbusd): 0 for two-digit tiles, TT for one-digit ones, TT - 1
// for a mixed one (Q8Driver's MixedTiles). Without lo digits the group's sum 128 * 127 * sum(hi) is a
// multiple of 127, so the hi sums start at -128 * sum(hi) and the epilogue's 127 * hi is the whole sum.
//
// No software prefetch: the next tile's blocks, requested one line per quad, cost 6-17 % of the tile's
// time in a kernel benchmark on Zen 4 (one- and two-digit rows, SmolLM2 and Llama-1B shapes, 128 and
// 512 tokens; docs/performance.md), and its L1 prefetcher follows the block streams from L2 by itself.
template <int TT, int RB, int kLoFrom>
inline void vnni_tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, float* y, int64_t ldy) {
  const int64_t G = w.n_groups;
  const uint8_t* blk[RB];
  for (int b = 0; b < RB; ++b) blk[b] = w.data + (b0 + b) * w.block_bytes;
  const int8_t* xt[TT];
  for (int t = 0; t < TT; ++t) xt[t] = x.q + (t0 + t) * 2 * x.stride;
  // The float sums change once per group: kept in memory, they leave all 32 registers to the integer
  // accumulators of the inner loop (in registers they made the compiler shuffle accumulators around).
  alignas(64) float acc[TT][RB][kQ8Rows];
  for (int t = 0; t < TT; ++t)
    for (int b = 0; b < RB; ++b) _mm512_store_ps(acc[t][b], _mm512_setzero_ps());
  // Only the two-digit tokens' lo sums exist (index t - kLoFrom).
  constexpr int kLoTokens = TT - kLoFrom;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t quads = g + 1 == G ? w.last_quads : w.group / 4;
    const int64_t off = g * w.group_bytes, begin = g * w.group;
    __m512i hi[TT][RB], lo[kLoTokens > 0 ? kLoTokens : 1][RB];
    for (int t = 0; t < TT; ++t) {
      const int32_t sum = x.sums[(t0 + t) * G + g];
      for (int b = 0; b < RB; ++b) {
        hi[t][b] = t >= kLoFrom ? _mm512_setzero_si512() : _mm512_set1_epi32(-sum / 127);
        if (t >= kLoFrom) lo[t - kLoFrom][b] = _mm512_set1_epi32(-sum);
      }
    }
#pragma GCC unroll 2
    for (int64_t i = 0; i < quads; ++i) {
      __m512i wv[RB];
      for (int b = 0; b < RB; ++b) wv[b] = _mm512_loadu_si512(blk[b] + off + i * 64);
      for (int t = 0; t < TT; ++t) {
        int32_t h4;
        std::memcpy(&h4, xt[t] + begin + 4 * i, 4);
        const __m512i xh = _mm512_set1_epi32(h4);
        for (int b = 0; b < RB; ++b) hi[t][b] = _mm512_dpbusd_epi32(hi[t][b], wv[b], xh);
        if (t >= kLoFrom) {
          int32_t l4;
          std::memcpy(&l4, xt[t] + x.stride + begin + 4 * i, 4);
          const __m512i xl = _mm512_set1_epi32(l4);
          for (int b = 0; b < RB; ++b) lo[t - kLoFrom][b] = _mm512_dpbusd_epi32(lo[t - kLoFrom][b], wv[b], xl);
        }
      }
    }
    for (int b = 0; b < RB; ++b) {
      const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(blk[b] + off + quads * 64));
      for (int t = 0; t < TT; ++t) {
        if (t >= kLoFrom) {
          // 127 * hi + lo in wrapping int32 arithmetic, exact since the result fits.
          const __m512i hi127 = _mm512_sub_epi32(_mm512_slli_epi32(hi[t][b], 7), hi[t][b]);
          const __m512i isum = _mm512_add_epi32(hi127, lo[t - kLoFrom][b]);
          const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(x.scales[(t0 + t) * G + g]));
          _mm512_store_ps(acc[t][b], _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, _mm512_load_ps(acc[t][b])));
        } else {
          // A one-digit row's group scale is its unit times 2^shift (Q8Acts::shifts): the shift of the
          // integer sum (exact, within int32 by q8_fast_max_shift) takes the place of the float multiply
          // by the activation's scale, which shared vpdpbusd's two pipes; the unit comes once at the end.
          const __m512i shifted = _mm512_sllv_epi32(hi[t][b], _mm512_set1_epi32(x.shifts[(t0 + t) * G + g]));
          _mm512_store_ps(acc[t][b], _mm512_fmadd_ps(_mm512_cvtepi32_ps(shifted), ws, _mm512_load_ps(acc[t][b])));
        }
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int b = 0; b < RB; ++b) {
      const int64_t row0 = (b0 + b) * kQ8Rows, rest = w.rows - row0;
      float* out = y + (t0 + t) * ldy + row0;
      __m512 v = _mm512_load_ps(acc[t][b]);
      if (t < kLoFrom) v = _mm512_mul_ps(v, _mm512_set1_ps(x.units[t0 + t]));
      if (rest >= kQ8Rows)
        _mm512_storeu_ps(out, v);
      else
        _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << rest) - 1u), v);
    }
}

// Tiles of kTokens tokens x 2 blocks over rows with two digits (kLo) or one. Two digits: 2 x 2 tiles,
// 8 accumulators, and per quad 2 weight loads and 4 activation broadcasts for 8 vpdpbusd. One digit
// (Q8Acts::one_digit_rows): half the accumulators per token, so 4 x 2 tiles keep the 8 accumulators and
// the loads per vpdpbusd. Measured on Zen 4 (tools/kernel_bench.py, both models' shapes): once GCC no
// longer shuffled the accumulators (CMakeLists.txt, -fno-tree-pre), 4 x 2, 3 x 2 and 2 x 3 two-digit
// tiles were within noise of 2 x 2 (~82 % of the two-digit ceiling), and 4 x 3 or 4 x 4 one-digit tiles
// 3-10 % slower than 4 x 2 (~72 % of the peak then). Both are bound by the epilogue: per 16 rows, token
// and 32-input group, 16 vpdpbusd (two digits) against a float multiply and multiply-add on the same
// pipes, and the int32 joins and conversion beside them; one digit, 8 vpdpbusd against a multiply-add
// since its group scales became shifts (77-83 % of the peak, docs/performance.md, eighteenth round).
template <int kTokensPerTile, bool kLo, bool kPrefetch = false>
struct VnniTiles {
  static constexpr int kTokens = kTokensPerTile;
  static constexpr int blocks(int tokens) { return tokens == 1 ? 1 : 2; }
  template <int TT, int RB>
  static inline void tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, float* y, int64_t ldy) {
    if constexpr (TT == 1 && RB == 1 && kLo)
      vnni_one_token<kPrefetch>(x, t0, w, b0, y, ldy);
    else
      vnni_tile<TT, RB, kLo ? 0 : TT>(x, t0, w, b0, y, ldy);
  }
};

// Q8Driver's MixedTiles: TT - 1 one-digit tokens and a two-digit one, over 2 blocks (10 accumulators for
// the 5 tokens of 4 one-digit rows and the last).
struct VnniMixedTiles {
  static constexpr int kTokens = 5;
  static constexpr int blocks(int) { return 2; }
  template <int TT, int RB>
  static inline void tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b0, float* y, int64_t ldy) {
    vnni_tile<TT, RB, TT - 1>(x, t0, w, b0, y, ldy);
  }
};

void matmul_q8(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
  Q8Driver<VnniTiles<2, true>, VnniTiles<4, false>, VnniMixedTiles>::matmul(x, w, b0, b1, y, ldy);
}

}  // namespace

void matmul_q8_avx512vnni_prefetching(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y,
                                      int64_t ldy) {
  if (x.T == 1) {
    // One token (decode): the range's quarters in step, four streams of weights at once (the last
    // blocks of a range not divisible by four alone). On the Xeon with AMX, tools/ab_forward.py, 3
    // rounds: one stream -> two: SmolLM2 int8 decode 130-138 -> 139-166 tok/s on 1 thread, 217-231 ->
    // 259-280 on 2, the 1B shape 9.9-10.1 -> 10.9-11.1 and 18.9-20.0 -> 21.7-22.1; two -> four: SmolLM2
    // 114-117 -> 120-132 and 230-239 -> 236-252, the 1B shape 10.4-10.6 -> 10.7-10.8 and 20.1-20.8 ->
    // 20.6-20.9.
    constexpr int kStreams = 4;
    const int64_t q = (b1 - b0) / kStreams;
    for (int64_t i = 0; i < q; ++i) {
      int64_t blocks[kStreams];
      for (int k = 0; k < kStreams; ++k) blocks[k] = b0 + k * q + i;
      vnni_one_token_blocks<kStreams, true>(x, 0, w, blocks, y, ldy);
    }
    for (int64_t b = b0 + kStreams * q; b < b1; ++b) vnni_one_token<true>(x, 0, w, b, y, ldy);
    return;
  }
  // Two-digit tiles only (one family: the driver then sums every row with two digits): the amx table,
  // which calls this, passes it two-digit rows only (its fast rows and their last row are its own).
  Q8Driver<VnniTiles<2, true, true>>::matmul(x, w, b0, b1, y, ldy);
}

namespace {

// The 512-bit dot-product rate: 8 independent vpdpbusd chains from registers; each iteration is
// 8 * 64 multiply-adds, reported in units of the probe's 8 * 32 (so iterations count double).
int64_t peak_loop(int64_t iterations) {
  __m512i acc[8];
  const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t it = 0; it < iterations / 2; ++it)
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  __m512i s = acc[0];
  for (int i = 1; i < 8; ++i) s = _mm512_add_epi32(s, acc[i]);
  // The sums wrap (vpdpbusd does) after enough iterations; lanes added as unsigned wrap without UB,
  // which _mm512_reduce_add_epi32's signed adds would be.
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, s);
  uint32_t total = 0;
  for (uint32_t lane : lanes) total += lane;
  return static_cast<int64_t>(total);
}

}  // namespace

const Kernels& kernels_avx512vnni() {
  static const Kernels table = [] {
    Kernels k = kernels_avx512();
    k.name = "avx512vnni";
    set_matmul_q8(k, &matmul_q8);
    k.q8_peak_loop = &peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
