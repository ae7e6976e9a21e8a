// AVX-512 with VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later). The f32/bf16 kernels are
// the AVX-512 ones; the int8 matmul is written for 512-bit registers here. Compiled with -mavx512vnni;
// only called after dispatch has checked the CPU.
//
// The int8 matmul works on 64-byte chunks: each 32-byte half of a chunk lies in one weight group (groups
// are multiples of 32), so lanes 0-7 of a 16-lane int32 accumulator belong to the first half's group and
// lanes 8-15 to the second's. vpdpbusd multiplies unsigned by signed bytes; activations are made
// unsigned by flipping their top bit (x + 128) once per token, and the 128 * sum(w) this adds is taken
// back with one more vpdpbusd of the weights against a vector of ones, shared by every token of a tile.
// Per token and row a chunk then costs two vpdpbusd (the hi and lo digits), a few integer ops to combine
// them, and one convert + multiply + FMA to apply both halves' scales.
#include <immintrin.h>

#include <cstdint>

#include "kernels/q8_x86.h"

namespace cpullm {
namespace {

constexpr int kChunk = 64;

inline __m512i load_bytes(const int8_t* p, int n) {
  if (n >= kChunk) return _mm512_loadu_si512(p);
  const __mmask64 m = n <= 0 ? 0 : (~__mmask64(0) >> (kChunk - n));
  return _mm512_maskz_loadu_epi8(m, p);
}

// [a x 8, b x 8]
inline __m512 pair_scales(float a, float b) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_setr_ps(a, b, 0.f, 0.f)));
}

template <int TT, int RR>
inline void vnni_tile(const int8_t* x, const float* xs, int64_t K, int64_t group, int64_t n_groups, const int8_t* w,
                      const float* ws, float* y, int64_t ldy) {
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[TT][RR];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < RR; ++r) acc[t][r] = _mm512_setzero_ps();
  // Group of each 32-byte half, advanced by counting (a division per chunk would cost more than the
  // chunk's arithmetic).
  const int64_t halves_per_group = group / 32;
  int64_t g = 0, half_in_group = 0;
  auto next_half = [&]() {
    const int64_t current = g;
    if (++half_in_group == halves_per_group) {
      half_in_group = 0;
      ++g;
    }
    return current;
  };
  for (int64_t c = 0; c < K; c += kChunk) {
    const int n = K - c < kChunk ? static_cast<int>(K - c) : kChunk;
    const int64_t ga = next_half();
    int64_t gb = next_half();
    if (gb >= n_groups) gb = n_groups - 1;  // a tail chunk of 32 bytes or less: its upper lanes are zero
    __m512i wv[RR], wsum[RR];
    __m512 wscale[RR];
    for (int r = 0; r < RR; ++r) {
      // Rows are short (a few KiB): ask for the next tile's rows now, so they arrive while this tile
      // computes, instead of leaving each new row stream to the hardware prefetcher's ramp-up.
      _mm_prefetch(reinterpret_cast<const char*>(w + (RR + r) * K + c), _MM_HINT_T0);
      wv[r] = load_bytes(w + r * K + c, n);
      // -128 * 128 * sum(w) per lane takes back what the digits' +128 offsets add (127 * 128 * sum(w)
      // through the hi digits, 128 * sum(w) through the lo ones). It seeds the lo digits' sum.
      wsum[r] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                 _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv[r]), 14));
      wscale[r] = pair_scales(ws[r * n_groups + ga], ws[r * n_groups + gb]);
    }
    for (int t = 0; t < TT; ++t) {
      const int8_t* xt = x + t * 2 * K + c;
      const __m512i xh = _mm512_xor_si512(load_bytes(xt, n), flip);
      const __m512i xl = _mm512_xor_si512(load_bytes(xt + K, n), flip);
      const __m512 xscale = pair_scales(xs[t * n_groups + ga], xs[t * n_groups + gb]);
      for (int r = 0; r < RR; ++r) {
        const __m512i dh = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xh, wv[r]);
        const __m512i dl = _mm512_dpbusd_epi32(wsum[r], xl, wv[r]);
        // 127 * dh + dl (dl already holds the offsets' correction); wrapping int32 arithmetic, exact
        // since the result fits.
        const __m512i isum = _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(dh, 7), dh), dl);
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(xscale, wscale[r]), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < RR; ++r) y[t * ldy + r] = _mm512_reduce_add_ps(acc[t][r]);
}

struct VnniTiles {
  static constexpr int rows(int tokens) { return tokens == 1 ? 4 : 3; }
  template <int TT, int RR>
  static inline void tile(const int8_t* x, const float* xs, int64_t K, int64_t group, int64_t n_groups,
                          const int8_t* w, const float* ws, float* y, int64_t ldy) {
    vnni_tile<TT, RR>(x, xs, K, group, n_groups, w, ws, y, ldy);
  }
};

// 48 rows x K=4096 int8 = 192 KiB: stays in L2 across token tiles.
void matmul_q8(const int8_t* x, const float* xs, int64_t T, int64_t K, int64_t group, const int8_t* w,
               const float* ws, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  Q8Driver<VnniTiles, 48>::matmul(x, xs, T, K, group, w, ws, n0, n1, y, ldy);
}

}  // namespace

const Kernels& kernels_avx512vnni() {
  static const Kernels table = [] {
    Kernels k = kernels_avx512();
    k.name = "avx512vnni";
    k.matmul_q8 = &matmul_q8;
    k.q8_peak_loop = &Q8Impl<Q8Vnni>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
