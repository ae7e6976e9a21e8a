// ISA-independent kernel bodies, written once over a small SIMD vocabulary `V`:
//   V::W                       lanes per vector
//   V::zero(), V::load(p), V::load_partial(p, n), V::store(p, v), V::store_partial(p, v, n)
//   V::load_bf16(p), V::load_bf16_partial(p, n)      (bf16 bits widened to f32 lanes)
//   V::load_f16(p)                                    (W IEEE binary16 values converted to f32 lanes, exactly)
//   V::store_f16(p, v)                                (float_to_half of each lane, to W binary16 values)
//   V::set1(a), V::fmadd(a, b, c) = a * b + c, V::reduce(v) = sum of lanes
//   V::add, V::sub, V::mul, V::div, V::min, V::max, V::exp(v) (within a few ulp of expf; the x86
//   vocabularies build it from exp_approx below with V::round_nearest and V::scale_pow2)
// Each kernels_<isa>.cpp defines its V in an anonymous namespace and instantiates KernelsImpl<V>, so
// the instantiations never merge across translation units built with different ISA flags. For the
// same reason nothing here calls into templates of the standard library.
#pragma once
#include <cstdint>

#include "kernels/kernels.h"

namespace cpullm {

// expf for vocabularies with V::round_nearest(v) and V::scale_pow2(p, n) = p * 2^n (n integral):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two so n * ln2 is exact), a degree-6 polynomial for
// exp(r) (Cephes' coefficients), then the power of two. Inputs are clamped to the range where the
// result is a normal float.
template <class V>
inline typename V::Vec exp_approx(typename V::Vec x) {
  using Vec = typename V::Vec;
  x = V::min(V::max(x, V::set1(-87.33654f)), V::set1(88.37626f));
  const Vec n = V::round_nearest(V::mul(x, V::set1(1.44269504088896341f)));
  Vec r = V::fmadd(n, V::set1(-0.693359375f), x);
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  Vec p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(V::mul(p, r), r, V::add(r, V::set1(1.f)));
  return V::scale_pow2(p, n);
}

// A batch size as a type, for attend_in_batches' callers (no std::integral_constant: see above).
template <int N>
struct Rows {
  static constexpr int value = N;
};

// Kernels::attend's batching, for every attention kernel alike: n_q rows in batches of up to
// kAttendHeads, row r seeing positions up to last + r / per_token; batch(Rows<NQ>(), h, lasts) takes
// the rows [h, h + NQ), whose ends are lasts[0, NQ).
template <class Batch>
inline void attend_in_batches(int64_t n_q, int64_t last, int64_t per_token, const Batch& batch) {
  static_assert(kAttendHeads == 6, "the batches below go up to 6 rows");
  for (int64_t h = 0; h < n_q;) {
    const int64_t size = n_q - h < kAttendHeads ? n_q - h : kAttendHeads;
    int64_t lasts[kAttendHeads];
    for (int64_t r = 0; r < size; ++r) lasts[r] = last + (h + r) / per_token;
    switch (size) {
      case 6: batch(Rows<6>(), h, lasts); break;
      case 5: batch(Rows<5>(), h, lasts); break;
      case 4: batch(Rows<4>(), h, lasts); break;
      case 3: batch(Rows<3>(), h, lasts); break;
      case 2: batch(Rows<2>(), h, lasts); break;
      default: batch(Rows<1>(), h, lasts); break;
    }
    h += size;
  }
}

template <class V>
struct KernelsImpl {
  using Vec = typename V::Vec;
  static constexpr int W = V::W;

  static inline Vec loadw(const float* p) { return V::load(p); }
  static inline Vec loadw(const uint16_t* p) { return V::load_bf16(p); }
  static inline Vec loadw_partial(const float* p, int n) { return V::load_partial(p, n); }
  static inline Vec loadw_partial(const uint16_t* p, int n) { return V::load_bf16_partial(p, n); }

  // TT tokens x RR rows of outputs held in registers: each weight vector loaded feeds TT FMAs and each
  // activation vector feeds RR. kAhead (one token only): each weight vector also requests the line
  // kAhead bytes on (see one_token_rows).
  template <int TT, int RR, int64_t kAhead = 0, class WT>
  static inline void tile(const float* x, int64_t K, const WT* w, float* y, int64_t ldy) {
    Vec acc[TT][RR];
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < RR; ++r) acc[t][r] = V::zero();
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      Vec wv[RR];
      for (int r = 0; r < RR; ++r) {
        // Several tokens: the next tile's rows, requested early: rows are short streams. One token
        // reads rows in order, a stream the hardware prefetcher follows.
        if (TT > 1) __builtin_prefetch(w + (RR + r) * K + k);
        if (kAhead > 0) __builtin_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kAhead);
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

  // One token (a prompt's last token past its 4-token tiles, and f32 decode on the amx table; decode
  // elsewhere reads four streams, matmul_f32 below): rows one after another, so the rows [r0, r1) are
  // read as one sequential stream. Each row keeps the tiles' order of additions, so a token's outputs
  // do not depend on how many tokens share the call. Out of line: decode's loop, which
  // lost ~8 % (bf16, AVX2) when the prompt tiles around it grew, inlined into one function with them.
  // kAhead > 0 requests the stream's line kAhead bytes ahead of each load (matmul_ahead): on an Intel
  // Xeon with AMX, 4 KiB ahead took SmolLM2 decode from 47-48 to 54-55 tok/s (bf16, 1 thread; 79-83 ->
  // 91-93 on 2) and from 28-29 to 30-32 (f32; 53-54 -> 57-58; tools/ab_forward.py, 3 rounds), where the
  // hardware prefetcher alone left it short of the bandwidth. On Zen 4 it cost f32 decode 2-8 %, and the
  // other tables keep it off.
  template <int64_t kAhead, class WT>
  __attribute__((noinline)) static void one_token_rows(const float* x, int64_t K, const WT* w, int64_t r0, int64_t r1,
                                                       float* y, int64_t ldy) {
    for (int64_t n = r0; n < r1; ++n) tile<1, 1, kAhead>(x, K, w + n * K, y + n, ldy);
  }

  // One token against the rows w[0 .. kStreams), each summed as tile<1, 1> sums it (the same bits), and
  // each stream's line kAhead bytes ahead requested (one_token_streams; kAhead > 0).
  template <int kStreams, int64_t kAhead, class WT>
  static inline void stream_rows(const float* x, int64_t K, const WT* const* w, float* const* y) {
    Vec acc[kStreams];
    for (int r = 0; r < kStreams; ++r) acc[r] = V::zero();
    int64_t k = 0;
    for (; k + W <= K; k += W) {
      const Vec xv = V::load(x + k);
      for (int r = 0; r < kStreams; ++r) {
        if constexpr (kAhead > 0) __builtin_prefetch(reinterpret_cast<const char*>(w[r] + k) + kAhead);
        acc[r] = V::fmadd(xv, loadw(w[r] + k), acc[r]);
      }
    }
    if (k < K) {
      const int rem = static_cast<int>(K - k);
      const Vec xv = V::load_partial(x + k, rem);
      for (int r = 0; r < kStreams; ++r) acc[r] = V::fmadd(xv, loadw_partial(w[r] + k, rem), acc[r]);
    }
    for (int r = 0; r < kStreams; ++r) *y[r] = V::reduce(acc[r]);
  }

  // One token: the rows' quarters in step, four streams of weights at once (as the int8 decode of the
  // amx table, kernels_avx512vnni.cpp), the rows past the last whole quarter alone; with kAhead > 0
  // each load also requests its stream's line kAhead bytes on (matmul_bf16_ahead).
  template <int64_t kAhead, class WT>
  __attribute__((noinline)) static void one_token_streams(const float* x, int64_t K, const WT* w, int64_t r0,
                                                          int64_t r1, float* y) {
    constexpr int kStreams = 4;
    const int64_t q = (r1 - r0) / kStreams;
    for (int64_t i = 0; i < q; ++i) {
      const WT* rows[kStreams];
      float* outs[kStreams];
      for (int r = 0; r < kStreams; ++r) {
        rows[r] = w + (r0 + r * q + i) * K;
        outs[r] = y + r0 + r * q + i;
      }
      stream_rows<kStreams, kAhead>(x, K, rows, outs);
    }
    for (int64_t n = r0 + kStreams * q; n < r1; ++n) {
      const WT* row = w + n * K;
      float* out = y + n;
      stream_rows<1, kAhead>(x, K, &row, &out);
    }
  }

  // All tokens against rows [r0, r1): a row block small enough to stay in cache while every token
  // tile passes over it.
  template <int TT, int64_t kAhead, class WT>
  static inline void token_tile_rows(const float* x, int64_t K, const WT* w, int64_t r0, int64_t r1, float* y,
                                     int64_t ldy) {
    if constexpr (TT == 1) {
      one_token_rows<kAhead>(x, K, w, r0, r1, y, ldy);
    } else {
      // 3 rows with 16 registers, 4 with AVX-512's 32: 12 or 16 accumulators with 4 tokens, each weight
      // vector loaded (and widened, for bf16) feeding 4 FMAs and each activation 3 or 4. SmolLM2 bf16,
      // 128 tokens, 1 thread (tools/ab_forward.py): on AVX2 3 rows ran 1.45x faster than 2 and 4 spilled;
      // on Zen 4's AVX-512 4 rows pre-fill 388-416 tok/s against 240-260 with 3 and 253-316 with 2
      // (2 threads: 694-767 against 441-493), and 6 tokens x 4 rows was no faster than 4 x 4.
      constexpr int RR = W == 16 ? 4 : 3;
      int64_t n = r0;
      for (; n + RR <= r1; n += RR) tile<TT, RR>(x, K, w + n * K, y + n, ldy);
      if (n + 2 <= r1) {
        tile<TT, 2>(x, K, w + n * K, y + n, ldy);
        n += 2;
      }
      for (; n < r1; ++n) tile<TT, 1>(x, K, w + n * K, y + n, ldy);
    }
  }

  template <int64_t kAhead = 0, class WT>
  static void matmul(const float* x, int64_t T, int64_t K, const WT* w, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
    constexpr int64_t kRowBlock = 16;  // 16 rows x K=4096 x 4 B = 256 KiB: within L2 on current cores.
    for (int64_t rb = n0; rb < n1; rb += kRowBlock) {
      const int64_t re = rb + kRowBlock < n1 ? rb + kRowBlock : n1;
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) token_tile_rows<4, kAhead>(x + t * K, K, w, rb, re, y + t * ldy, ldy);
      switch (T - t) {
        case 3: token_tile_rows<3, kAhead>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        case 2: token_tile_rows<2, kAhead>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        case 1: token_tile_rows<1, kAhead>(x + t * K, K, w, rb, re, y + t * ldy, ldy); break;
        default: break;
      }
    }
  }

  // Decode in four streams (one_token_streams, no requests): each row is one chain of dependent
  // multiply-adds, so one row at a time waits on their latency; four rows from the range's quarters in
  // step are four chains and four long streams (four adjacent rows were four short interleaved streams,
  // which the prefetcher meets cold). Zen 4, tools/ab_forward.py, 3 rounds, one stream -> four: SmolLM2
  // bf16 decode 73-76 -> 107-110 tok/s on 1 thread, the 1B shape 6.6-6.8 -> 11.1-11.6 (2 threads:
  // 109-121 -> 119-135 and 12.3-12.5 -> 14.4-14.7); SmolLM2 f32 51-53 -> 60-62; on its AVX2 path (the
  // same core, CPULLM_ISA=avx2) bf16 68-74 -> 104-110, f32 55-57 -> 59-61. With the read-ahead of the amx
  // table (matmul_*_ahead) instead, bf16 gained less than half as much and f32 lost 2-8 %. Not timed on Arm.
  static void matmul_f32(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                         int64_t ldy) {
    if (T == 1)
      one_token_streams<0>(x, K, w, n0, n1, y);
    else
      matmul(x, T, K, w, n0, n1, y, ldy);
  }
  static void matmul_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                          float* y, int64_t ldy) {
    if (T == 1)
      one_token_streams<0>(x, K, w, n0, n1, y);
    else
      matmul(x, T, K, w, n0, n1, y, ldy);
  }
  // The same, decode reading 4 KiB ahead (one_token_rows); bf16 decode in four streams
  // (one_token_streams). On the Xeon with AMX (the amx table), tools/ab_forward.py, SmolLM2, 3 rounds,
  // four streams took bf16 decode from 54-56 to 64-68 tok/s on 1 thread and from 85-89 to 122-126 on
  // 2; f32 31-33 -> 31-32 and 58-59 -> 60-61, so f32 keeps one.
  static constexpr int64_t kReadAhead = 4096;
  static void matmul_f32_ahead(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                               int64_t ldy) {
    matmul<kReadAhead>(x, T, K, w, n0, n1, y, ldy);
  }
  static void matmul_bf16_ahead(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                                float* y, int64_t ldy) {
    if (T == 1)
      one_token_streams<kReadAhead>(x, K, w, n0, n1, y);
    else
      matmul<kReadAhead>(x, T, K, w, n0, n1, y, ldy);
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

  static_assert(sizeof(Half) == sizeof(uint16_t), "an array of Half is an array of its bits");
  static void to_f16(const float* x, Half* out, int64_t n) {
    int64_t i = 0;
    for (; i + W <= n; i += W) V::store_f16(reinterpret_cast<uint16_t*>(out + i), V::load(x + i));
    for (; i < n; ++i) out[i] = float_to_half(x[i]);
  }

  // out[i] = silu(gate[i]) * up[i]. out may be gate itself (Sequence::swiglu writes over the gate).
  static void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
    const Vec one = V::set1(1.f), zero = V::zero();
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      const Vec g = V::load(gate + i);
      V::store(out + i, V::mul(V::div(g, V::add(one, V::exp(V::sub(zero, g)))), V::load(up + i)));
    }
    if (i < n) {
      const int rem = static_cast<int>(n - i);
      const Vec g = V::load_partial(gate + i, rem);
      V::store_partial(out + i, V::mul(V::div(g, V::add(one, V::exp(V::sub(zero, g)))), V::load_partial(up + i, rem)),
                       rem);
    }
  }

  // Registers a batch of query heads may hold as accumulators (of 32 vector registers with AVX-512, 16
  // otherwise), which sets how many heads of a KV group attend together.
  static constexpr int kAccRegs = W == 16 ? 24 : 10;

  // Partial sums per score, over d mod kScoreChains: enough independent multiply-add chains to hide their
  // latency even for a single head, while a block is read front to back.
  static constexpr int kScoreChains = W == 16 ? 4 : 2;
  // Heads whose scores one pass over a key block can hold in registers.
  static constexpr int kScoreHeads = kAccRegs / (kScoreChains * (kKeyBlock / W));

  // Elements of the KV cache, f32 or f16, as f32 lanes; the attention below is written once for both.
  static inline Vec loadkv(const float* p) { return V::load(p); }
  static inline Vec loadkv(const Half* p) { return V::load_f16(reinterpret_cast<const uint16_t*>(p)); }
  static inline void axpy_kv(float a, const float* x, float* y, int64_t n) { axpy_f32(a, x, y, n); }
  // The same fused multiply-adds as axpy_f32 on the converted values (it was a scalar multiply and add,
  // for head sizes that are no whole number of vectors).
  static inline void axpy_kv(float a, const Half* x, float* y, int64_t n) {
    const Vec av = V::set1(a);
    int64_t i = 0;
    for (; i + W <= n; i += W) V::store(y + i, V::fmadd(av, V::load_f16(reinterpret_cast<const uint16_t*>(x + i)), V::load(y + i)));
    if (i < n) {
      const int rem = static_cast<int>(n - i);
      float tail[W];
      for (int j = 0; j < rem; ++j) tail[j] = half_to_float(x[i + j]);
      V::store_partial(y + i, V::fmadd(av, V::load_partial(tail, rem), V::load_partial(y + i, rem)), rem);
    }
  }

  // scores_h[j] = scale * q_h . k_j for the kKeyBlock positions j of the key block kb, for NQ query heads
  // (rows hd apart in q, ld apart in scores): each key row loaded feeds NQ multiply-adds. Blocks go one
  // at a time, in order, so the key cache is read as one sequential stream: two blocks interleaved (two
  // streams a page apart) held a Zen 4 core to ~9 GB/s. Every head's sums are added in the same order
  // whatever NQ is, so heads batched or alone give the same bits.
  template <int NQ, class KT>
  static inline void block_scores(const float* q, int64_t hd, const KT* kb, float scale, float* scores,
                                  int64_t ld) {
    constexpr int R = kKeyBlock / W;  // vectors per block row
    constexpr int S = kScoreChains;
    Vec acc[NQ][S][R];
    for (int h = 0; h < NQ; ++h)
      for (int c = 0; c < S; ++c)
        for (int r = 0; r < R; ++r) acc[h][c][r] = V::zero();
    const auto step = [&](int64_t d, int c) {
      Vec qd[NQ];
      for (int h = 0; h < NQ; ++h) qd[h] = V::set1(q[h * hd + d]);
      for (int r = 0; r < R; ++r) {
        const Vec kv = loadkv(kb + d * kKeyBlock + r * W);
        for (int h = 0; h < NQ; ++h) acc[h][c][r] = V::fmadd(qd[h], kv, acc[h][c][r]);
      }
    };
    int64_t d = 0;
    for (; d + S <= hd; d += S)
      for (int c = 0; c < S; ++c) step(d + c, c);
    for (; d < hd; ++d) step(d, 0);
    const Vec vs = V::set1(scale);
    for (int h = 0; h < NQ; ++h)
      for (int r = 0; r < R; ++r) {
        Vec sum = acc[h][0][r];
        for (int c = 1; c < S; ++c) sum = V::add(sum, acc[h][c][r]);
        V::store(scores + h * ld + r * W, V::mul(sum, vs));
      }
  }

  // block_scores for any NQ, in batches of at most kScoreHeads heads.
  template <int NQ, class KT>
  static inline void batch_scores(const float* q, int64_t hd, const KT* kb, float scale, float* scores,
                                  int64_t ld) {
    constexpr int SQ = kScoreHeads > 0 ? kScoreHeads : 1;
    if constexpr (NQ <= SQ) {
      block_scores<NQ>(q, hd, kb, scale, scores, ld);
    } else {
      block_scores<SQ>(q, hd, kb, scale, scores, ld);
      batch_scores<NQ - SQ>(q + SQ * hd, hd, kb, scale, scores + SQ * ld, ld);
    }
  }

  // out_h = sum_p w_h[p] * v_p for NQ heads (weights ld apart, outputs hd apart) and NV whole vectors per
  // head, the sums held in registers: each value row loaded feeds NQ multiply-adds.
  template <int NV, int NQ, class KT>
  static inline void head_mix(const float* w, int64_t ld, const KT* v, int64_t n, int64_t hd, float* out) {
    Vec acc[NQ][NV];
    for (int h = 0; h < NQ; ++h)
      for (int j = 0; j < NV; ++j) acc[h][j] = V::zero();
    for (int64_t p = 0; p < n; ++p) {
      Vec wp[NQ];
      for (int h = 0; h < NQ; ++h) wp[h] = V::set1(w[h * ld + p]);
      for (int j = 0; j < NV; ++j) {
        const Vec vv = loadkv(v + p * hd + j * W);
        for (int h = 0; h < NQ; ++h) acc[h][j] = V::fmadd(wp[h], vv, acc[h][j]);
      }
    }
    for (int h = 0; h < NQ; ++h)
      for (int j = 0; j < NV; ++j) V::store(out + h * hd + j * W, acc[h][j]);
  }

  // head_mix over rows too wide for the registers: a few vectors of every row at a time while that
  // keeps at least two per row, else half the rows at a time, down to one row in pieces of
  // kAccRegs vectors (each vector's and row's sums are their own, so no split changes a bit).
  template <int NV, int NQ, class KT>
  static inline void mix_whole(const float* w, int64_t ld, const KT* v, int64_t n, int64_t hd, float* out) {
    constexpr int P = kAccRegs / NQ;  // vectors per row that fit
    if constexpr (NV * NQ <= kAccRegs) {
      head_mix<NV, NQ>(w, ld, v, n, hd, out);
    } else if constexpr (P >= 2 || NQ == 1) {
      head_mix<P, NQ>(w, ld, v, n, hd, out);
      mix_whole<NV - P, NQ>(w, ld, v + P * W, n, hd, out + P * W);
    } else {
      mix_whole<NV, NQ / 2>(w, ld, v, n, hd, out);
      mix_whole<NV, NQ - NQ / 2>(w + NQ / 2 * ld, ld, v, n, hd, out + NQ / 2 * hd);
    }
  }

  // In place: scores[0, n) -> softmax(scores[0, n)); stats (when not null) gets {max, sum of exp(s - max)}.
  static inline void softmax(float* scores, int64_t n, float* stats) {
    Vec vm = V::set1(scores[0]);
    int64_t p = 0;
    for (; p + W <= n; p += W) vm = V::max(vm, V::load(scores + p));
    alignas(64) float lanes[W];
    V::store(lanes, vm);
    float mx = lanes[0];
    for (int j = 1; j < W; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
    for (; p < n; ++p) mx = scores[p] > mx ? scores[p] : mx;
    const Vec vmx = V::set1(mx);
    Vec vsum = V::zero();
    for (p = 0; p + W <= n; p += W) {
      const Vec e = V::exp(V::sub(V::load(scores + p), vmx));
      V::store(scores + p, e);
      vsum = V::add(vsum, e);
    }
    float sum = V::reduce(vsum);
    if (p < n) {
      const int rem = static_cast<int>(n - p);
      V::store_partial(scores + p, V::exp(V::sub(V::load_partial(scores + p, rem), vmx)), rem);
      for (; p < n; ++p) sum += scores[p];
    }
    if (stats) {
      stats[0] = mx;
      stats[1] = sum;
    }
    const Vec inv = V::set1(1.f / sum);
    for (p = 0; p + W <= n; p += W) V::store(scores + p, V::mul(V::load(scores + p), inv));
    for (const float inv_s = 1.f / sum; p < n; ++p) scores[p] *= inv_s;
  }

  // NQ query rows of one KV group: row h over the cached positions [first, lasts[h]] (lasts
  // nondecreasing: the rows of a tile of consecutive tokens, or one token's heads, all alike).
  template <int NQ, class KT>
  static void attend_heads(const float* q, const KT* k, const KT* v, int64_t first, const int64_t* lasts,
                           int64_t hd, float scale, float* all_scores, float* out, float* stats) {
    const int64_t b_first = first / kKeyBlock, b_last = lasts[NQ - 1] / kKeyBlock;
    const int64_t ld = (b_last - b_first + 1) * kKeyBlock;  // one row of scores
    for (int64_t b = b_first; b <= b_last; ++b)
      batch_scores<NQ>(q, hd, k + b * hd * kKeyBlock, scale, all_scores + (b - b_first) * kKeyBlock, ld);
    // The blocks' positions outside a row's range were scored too (from whatever the cache holds there)
    // and are left out from here on.
    float* scores = all_scores + (first - b_first * kKeyBlock);
    for (int h = 0; h < NQ; ++h) softmax(scores + h * ld, lasts[h] - first + 1, stats ? stats + 2 * h : nullptr);
    v += first * hd;
    const int64_t shared = lasts[0] - first + 1;  // positions every row sees
    bool tails = true;  // rows that see more positions go on from the shared ones below
    switch (hd % W == 0 ? hd / W : 0) {  // whole vectors per head, or 0 for the general path
      case 1: mix_whole<1, NQ>(scores, ld, v, shared, hd, out); break;
      case 2: mix_whole<2, NQ>(scores, ld, v, shared, hd, out); break;
      case 3: mix_whole<3, NQ>(scores, ld, v, shared, hd, out); break;
      case 4: mix_whole<4, NQ>(scores, ld, v, shared, hd, out); break;
      case 5: mix_whole<5, NQ>(scores, ld, v, shared, hd, out); break;
      case 6: mix_whole<6, NQ>(scores, ld, v, shared, hd, out); break;
      case 8: mix_whole<8, NQ>(scores, ld, v, shared, hd, out); break;
      case 16: mix_whole<16, NQ>(scores, ld, v, shared, hd, out); break;  // 128 on 8 lanes, 64 on 4
      case 32: mix_whole<32, NQ>(scores, ld, v, shared, hd, out); break;  // 128 on 4 lanes
      default:
        tails = false;
        for (int h = 0; h < NQ; ++h) {
          float* o = out + h * hd;
          for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
          for (int64_t j = 0; j <= lasts[h] - first; ++j) axpy_kv(scores[h * ld + j], v + j * hd, o, hd);
        }
    }
    // The same fused multiply-adds, in the same order, as a row whose every position went through
    // head_mix: a row's bits do not depend on the rows it was batched with.
    if (tails)
      for (int h = 0; h < NQ; ++h)
        for (int64_t j = shared; j <= lasts[h] - first; ++j) axpy_kv(scores[h * ld + j], v + j * hd, out + h * hd, hd);
  }

  // n_q query rows of one KV group (see Kernels::attend for the layouts), kAttendHeads at a time; row r
  // sees [first, last + r / per_token].
  template <class KT>
  static void attend(const float* q, int64_t n_q, const KT* k, const KT* v, int64_t first, int64_t last,
                     int64_t per_token, int64_t hd, float scale, float* scores, float* out, float* stats) {
    static_assert(kKeyBlock % W == 0, "a key block row is whole vectors");
    attend_in_batches(n_q, last, per_token, [&](auto rows, int64_t h, const int64_t* lasts) {
      attend_heads<decltype(rows)::value>(q + h * hd, k, v, first, lasts, hd, scale, scores, out + h * hd,
                                          stats ? stats + 2 * h : nullptr);
    });
  }

  static Kernels table(const char* name) {
    Kernels k;
    k.name = name;
    k.matmul_f32 = &matmul_f32;
    k.matmul_bf16 = &matmul_bf16;
    k.dot_f32 = &dot_f32;
    k.axpy_f32 = &axpy_f32;
    k.silu_mul = &silu_mul;
    k.attend = &attend<float>;
    k.attend_f16 = &attend<Half>;
    k.to_f16 = &to_f16;
    return k;
  }
};

}  // namespace cpullm
