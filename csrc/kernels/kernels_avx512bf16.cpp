// AVX-512 with VNNI and BF16 (Zen 4, Sapphire Rapids, Cooper Lake): the AVX512-VNNI path, plus fast
// prefill's attention over bf16 copies of the KV cache (Kernels::attend_bf16, layouts at Bf16 in
// kernels.h). vdpbf16ps sums two bf16 products into each f32 lane: on Zen 4 it issues at the rate of
// vfmadd231ps (a register loop: 1.83 G instructions/s for either), so twice the multiply-adds, and a
// 512-token fast prefill spends about a fifth of its time in attention's multiply-adds
// (docs/performance.md). Compiled with -mavx512bf16; only called after dispatch has checked the CPU.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/avx512_vocab.h"

namespace cpullm {
namespace {

using Impl = KernelsImpl<Avx512V>;

// The largest head the query rows' bf16 copies (on the stack) hold; the model keeps larger heads on the
// f32 attention.
constexpr int64_t kMaxHeadDim = kBf16MaxHeadDim;
// Accumulators a batch of rows may hold (of 32 registers), and partial sums per score over the pairs
// of components mod kChains, for every batch size alike, so that a row's bits do not depend on the
// rows batched with it (as Impl::block_scores).
constexpr int kAccRegs = 24;
constexpr int kChains = 4;
static_assert(kAttendHeads * kChains <= kAccRegs, "a batch's scores fit the registers");

inline __m512bh as_bh(__m512i v) {
  __m512bh r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}

// The pair of bf16 values at p (p[0] in the low half), in every lane.
inline __m512bh bcast_pair(const uint16_t* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  return as_bh(_mm512_set1_epi32(word));
}

// scores_h[j] = scale * q_h . k_j for the kKeyBlock positions of the key block kb, for NQ rows of q
// rounded to bf16 (qb: rows hd apart; in order, so element pair (2i, 2i + 1) is the i-th 32-bit word).
template <int NQ>
inline void block_scores(const uint16_t* qb, int64_t hd, const uint16_t* kb, float scale, float* scores, int64_t ld) {
  static_assert(kKeyBlock == 16, "a block row pair is one 32-element vector");
  __m512 acc[NQ][kChains];
  for (int h = 0; h < NQ; ++h)
    for (int c = 0; c < kChains; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < hd / 2; i += kChains)  // hd % 16 == 0: whole steps of kChains pairs
    for (int c = 0; c < kChains; ++c) {
      const __m512bh kv = as_bh(_mm512_loadu_si512(kb + (i + c) * 2 * kKeyBlock));
      for (int h = 0; h < NQ; ++h) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], bcast_pair(qb + h * hd + 2 * (i + c)), kv);
    }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int h = 0; h < NQ; ++h) {
    __m512 sum = acc[h][0];
    for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[h][c]);
    _mm512_storeu_ps(scores + h * ld, _mm512_mul_ps(sum, vs));
  }
}

// out_h[16 n + i] = sum_j w_h(2j) v(2j)[16 n + i] + w_h(2j + 1) v(2j + 1)[16 n + i] over n_pairs pairs of
// positions, for NQ rows of bf16 weights (w: pair j at w + 2 j, rows ldw apart) and NV vectors of the
// paired values (v: pair j at v + 2 j hd), the sums in registers.
template <int NV, int NQ>
inline void pair_mix(const uint16_t* w, int64_t ldw, const uint16_t* v, int64_t n_pairs, int64_t hd, float* out) {
  __m512 acc[NQ][NV];
  for (int h = 0; h < NQ; ++h)
    for (int n = 0; n < NV; ++n) acc[h][n] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_pairs; ++j) {
    __m512bh wp[NQ];
    for (int h = 0; h < NQ; ++h) wp[h] = bcast_pair(w + h * ldw + 2 * j);
    for (int n = 0; n < NV; ++n) {
      const __m512bh vv = as_bh(_mm512_loadu_si512(v + 2 * j * hd + 32 * n));
      for (int h = 0; h < NQ; ++h) acc[h][n] = _mm512_dpbf16_ps(acc[h][n], wp[h], vv);
    }
  }
  for (int h = 0; h < NQ; ++h)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(out + h * hd + 16 * n, acc[h][n]);
}

// pair_mix over rows too wide for the registers, split as Impl::mix_whole splits (each output vector's
// sum is its own, so no split changes a bit).
template <int NV, int NQ>
inline void mix_whole(const uint16_t* w, int64_t ldw, const uint16_t* v, int64_t n_pairs, int64_t hd, float* out) {
  constexpr int P = kAccRegs / NQ;
  if constexpr (NV * NQ <= kAccRegs) {
    pair_mix<NV, NQ>(w, ldw, v, n_pairs, hd, out);
  } else if constexpr (P >= 2 || NQ == 1) {
    pair_mix<P, NQ>(w, ldw, v, n_pairs, hd, out);
    mix_whole<NV - P, NQ>(w, ldw, v + 32 * P, n_pairs, hd, out + 16 * P);
  } else {
    mix_whole<NV, NQ / 2>(w, ldw, v, n_pairs, hd, out);
    mix_whole<NV, NQ - NQ / 2>(w + NQ / 2 * ldw, ldw, v, n_pairs, hd, out + NQ / 2 * hd);
  }
}

// NQ rows over the positions [first, lasts[h]] (lasts nondecreasing), as Impl::attend_heads.
template <int NQ>
void attend_heads(const float* q, const uint16_t* k, const uint16_t* v, int64_t first, const int64_t* lasts,
                  int64_t hd, float scale, float* all_scores, float* out, float* stats) {
  alignas(64) uint16_t qb[NQ * kMaxHeadDim];
  for (int h = 0; h < NQ; ++h)
    for (int64_t d = 0; d < hd; d += 16) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_loadu_ps(q + h * hd + d));
      std::memcpy(qb + h * hd + d, &r, sizeof r);
    }
  const int64_t b_first = first / kKeyBlock, b_last = lasts[NQ - 1] / kKeyBlock;
  const int64_t ld = (b_last - b_first + 1) * kKeyBlock, base = b_first * kKeyBlock;
  for (int64_t b = b_first; b <= b_last; ++b)
    block_scores<NQ>(qb, hd, k + b * hd * kKeyBlock, scale, all_scores + (b - b_first) * kKeyBlock, ld);
  // Whole pairs of positions from here on: the pair that holds `first` to the one that holds the last
  // row's end (both inside the scored blocks, which start and end on even positions). A row's weights
  // outside its own range are zero (its scores there came from positions it does not see, or from
  // whatever the cache's last block holds past its end), and are rounded to bf16 over the f32 scores in
  // place: the bf16 weight of position p at element p - base of the row read as bf16.
  const int64_t p_begin = first & ~int64_t(1), p_end = lasts[NQ - 1] | 1;  // p_end inclusive
  for (int h = 0; h < NQ; ++h) {
    float* row = all_scores + h * ld;
    Impl::softmax(row + (first - base), lasts[h] - first + 1, stats ? stats + 2 * h : nullptr);
    for (int64_t p = p_begin; p < first; ++p) row[p - base] = 0.f;
    for (int64_t p = lasts[h] + 1; p <= p_end; ++p) row[p - base] = 0.f;
    uint16_t* w = reinterpret_cast<uint16_t*>(row);
    // Each step reads its 16 floats before it writes their 16 bf16 values, which land at or before
    // the floats it has read: no value is overwritten before it is converted.
    for (int64_t i = p_begin - base; i <= p_end - base; i += 16) {
      const int rem = p_end - base + 1 - i < 16 ? static_cast<int>(p_end - base + 1 - i) : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << rem) - 1u);
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + i));
      __m256i bits;
      std::memcpy(&bits, &r, sizeof bits);
      _mm256_mask_storeu_epi16(w + i, m, bits);
    }
  }
  const uint16_t* w = reinterpret_cast<const uint16_t*>(all_scores) + (p_begin - base);
  const int64_t ldw = 2 * ld, n_pairs = (p_end - p_begin + 1) / 2;
  v += p_begin * hd;
  switch (hd / 16) {
    case 2: mix_whole<2, NQ>(w, ldw, v, n_pairs, hd, out); break;
    case 4: mix_whole<4, NQ>(w, ldw, v, n_pairs, hd, out); break;
    case 5: mix_whole<5, NQ>(w, ldw, v, n_pairs, hd, out); break;
    case 6: mix_whole<6, NQ>(w, ldw, v, n_pairs, hd, out); break;
    case 8: mix_whole<8, NQ>(w, ldw, v, n_pairs, hd, out); break;
    case 16: mix_whole<16, NQ>(w, ldw, v, n_pairs, hd, out); break;
    default:  // one vector of every row at a time: the same sums
      for (int64_t n = 0; n < hd / 16; ++n) mix_whole<1, NQ>(w, ldw, v + 32 * n, n_pairs, hd, out + 16 * n);
  }
}

void attend(const float* q, int64_t n_q, const Bf16* k, const Bf16* v, int64_t first, int64_t last, int64_t per_token,
            int64_t hd, float scale, float* scores, float* out, float* stats) {
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(k);
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(v);
  attend_in_batches(n_q, last, per_token, [&](auto rows, int64_t h, const int64_t* lasts) {
    attend_heads<decltype(rows)::value>(q + h * hd, kb, vb, first, lasts, hd, scale, scores, out + h * hd,
                                        stats ? stats + 2 * h : nullptr);
  });
}

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// Kernels::pair_bf16: vcvtne2ps2bf16 rounds two rows' 16 values each (nearest even), and a permutation
// interleaves them.
template <class T>
void pair_rows(const T* x, int64_t ld, int64_t n, int64_t rows, Bf16* out) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t r = 0; 2 * r < rows; ++r) {
    const T* a = x + 2 * r * ld;
    const bool has_b = 2 * r + 1 < rows;
    for (int64_t i = 0; i < n; i += 16) {
      const int rem = n - i < 16 ? static_cast<int>(n - i) : 16;
      const __mmask16 m = static_cast<__mmask16>((1u << rem) - 1u);
      const __m512 va = load16(a + i, m), vb = has_b ? load16(a + ld + i, m) : _mm512_setzero_ps();
      const __m512bh both = _mm512_cvtne2ps_pbh(vb, va);  // va's 16 values first
      __m512i bits;
      std::memcpy(&bits, &both, sizeof bits);
      const __mmask32 m2 = rem == 16 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (2 * rem)) - 1u);
      _mm512_mask_storeu_epi16(o + (r * n + i) * 2, m2, _mm512_permutexvar_epi16(interleave, bits));
    }
  }
}

}  // namespace

const Kernels& kernels_avx512bf16() {
  static const Kernels table = [] {
    Kernels k = kernels_avx512vnni();
    k.name = "avx512bf16";
    k.attend_bf16 = &attend;
    k.pair_bf16 = &pair_rows<float>;
    k.pair_bf16_f16 = &pair_rows<Half>;
    return k;
  }();
  return table;
}

}  // namespace cpullm
