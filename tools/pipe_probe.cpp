// Instruction-mix probes behind docs/performance.md's sixth round: how many AVX-512 multiply-adds of a
// kind one core retires per second, alone and next to the other instructions the int8 tiles need. Not
// part of the package (it needs AVX-512 VNNI and BF16 at build time); build and run it by hand:
//
//   g++ -O3 -mavx512f -mavx512bw -mavx512vnni -mavx512bf16 tools/pipe_probe.cpp -o /tmp/pipe_probe
//   /tmp/pipe_probe
//
// Every loop keeps 8-12 independent accumulator chains in registers, so latency does not limit it.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

namespace {

constexpr long kIterations = 50'000'000;

template <class Body>
double per_second(long iterations, int ops_per_iteration, Body&& body) {
  const auto start = std::chrono::steady_clock::now();
  body(iterations);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return double(iterations) * ops_per_iteration / s / 1e9;
}

// 8 vpdpbusd per iteration, plus `Extra` of: 1 two vmulps, 2 two vcvtdq2ps, 3 four integer adds / shifts.
template <int Extra>
double vpdpbusd_with(long iterations) {
  return per_second(iterations, 8, [](long n) {
    __m512i acc[8];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
    for (auto& v : acc) v = _mm512_setzero_si512();
    __m512 f0 = _mm512_set1_ps(1.f), f1 = f0;
    const __m512 m = _mm512_set1_ps(1.0000001f);
    __m512i i0 = a, i1 = a, i2 = a, i3 = a;
    for (long k = 0; k < n; ++k) {
      for (auto& v : acc) v = _mm512_dpbusd_epi32(v, a, b);
      if constexpr (Extra == 1) {
        f0 = _mm512_mul_ps(f0, m);
        f1 = _mm512_mul_ps(f1, m);
      }
      if constexpr (Extra == 2) {
        f0 = _mm512_cvtepi32_ps(i0);
        f1 = _mm512_cvtepi32_ps(i1);
        asm volatile("" : "+v"(f0), "+v"(f1));
      }
      if constexpr (Extra == 3) {
        i0 = _mm512_add_epi32(i0, a);
        i1 = _mm512_add_epi32(i1, a);
        i2 = _mm512_slli_epi32(i2, 1);
        i3 = _mm512_sub_epi32(i3, a);
      }
    }
    for (auto& v : acc) asm volatile("" : : "v"(v));
    asm volatile("" : : "v"(f0), "v"(f1), "v"(i0), "v"(i1), "v"(i2), "v"(i3));
  });
}

// The one-digit 4 x 2 tile's inner loop from L1: per quad 2 weight loads and 4 activation broadcasts
// for 8 vpdpbusd, with or without a prefetch of the next tile's two lines.
alignas(64) uint8_t weights[16384];
alignas(64) int8_t acts[4][4096];

template <bool kPrefetch>
double tile_loop(long iterations) {
  return per_second(iterations, 8, [](long n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (long k = 0; k < n; k += 64) {
#pragma GCC unroll 4
      for (int q = 0; q < 64; ++q) {
        const uint8_t* p = weights + q * 128;
        const __m512i w0 = _mm512_load_si512(p), w1 = _mm512_load_si512(p + 64);
        if constexpr (kPrefetch) {
          _mm_prefetch(reinterpret_cast<const char*>(p) + 8192, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p) + 8192 + 64, _MM_HINT_T0);
        }
        int32_t x[4];
        for (int t = 0; t < 4; ++t) std::memcpy(&x[t], acts[t] + 4 * q, 4);
        const __m512i x0 = _mm512_set1_epi32(x[0]), x1 = _mm512_set1_epi32(x[1]);
        const __m512i x2 = _mm512_set1_epi32(x[2]), x3 = _mm512_set1_epi32(x[3]);
        a0 = _mm512_dpbusd_epi32(a0, w0, x0);
        a1 = _mm512_dpbusd_epi32(a1, w1, x0);
        a2 = _mm512_dpbusd_epi32(a2, w0, x1);
        a3 = _mm512_dpbusd_epi32(a3, w1, x1);
        a4 = _mm512_dpbusd_epi32(a4, w0, x2);
        a5 = _mm512_dpbusd_epi32(a5, w1, x2);
        a6 = _mm512_dpbusd_epi32(a6, w0, x3);
        a7 = _mm512_dpbusd_epi32(a7, w1, x3);
      }
    }
    asm volatile("" : : "v"(a0), "v"(a1), "v"(a2), "v"(a3), "v"(a4), "v"(a5), "v"(a6), "v"(a7));
  });
}

// A one-digit 4 x 2 tile's group, 64 vpdpbusd, then its 8 epilogues (per token and 16-row block) with the
// float sums through memory as in vnni_tile. kShift false: 127 * hi, times (weight scales * the
// activation's scale), multiply-added (the epilogue before power-of-two group scales); true: hi shifted
// by the group's shift and multiply-added with the weight scales (vnni_tile's one-digit epilogue now).
alignas(64) float sums[8][16];
alignas(64) float group_scales[2][16];
alignas(64) float act_scales[4] = {0.5f, 0.5f, 0.5f, 0.5f};
alignas(64) int32_t shifts[4] = {3, 3, 3, 3};

template <bool kShift>
double epilogue_loop(long iterations) {
  for (auto& row : group_scales)
    for (float& v : row) v = 1e-3f;
  return per_second(iterations, 64, [](long n) {
    for (long k = 0; k < n; ++k) {
      __m512i acc[8];
      for (int j = 0; j < 8; ++j) {  // distinct starts: the compiler may not merge the chains
        acc[j] = _mm512_set1_epi32(int(k) + j);
        asm volatile("" : "+v"(acc[j]));
      }
      __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
      asm volatile("" : "+v"(a), "+v"(b));
      for (int q = 0; q < 8; ++q)
        for (auto& v : acc) v = _mm512_dpbusd_epi32(v, a, b);
      for (int blk = 0; blk < 2; ++blk) {
        const __m512 ws = _mm512_load_ps(group_scales[blk]);
        for (int t = 0; t < 4; ++t) {
          __m512i h = acc[2 * t + blk];
          __m512 s = ws;
          if constexpr (kShift) {
            h = _mm512_sllv_epi32(h, _mm512_set1_epi32(shifts[t]));
          } else {
            h = _mm512_sub_epi32(_mm512_slli_epi32(h, 7), h);
            s = _mm512_mul_ps(ws, _mm512_set1_ps(act_scales[t]));
          }
          float* out = sums[2 * t + blk];
          _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), s, _mm512_load_ps(out)));
        }
      }
      asm volatile("" ::: "memory");
    }
  });
}

// 12 chains of zmm vfmadd231ps (f32) or vdpbf16ps (bf16 pairs into f32).
template <bool kBf16>
double fma_rate(long iterations) {
  return per_second(iterations, 12, [](long n) {
    __m512 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(float(i));
    const __m512 m = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(0.001f);
    const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (long k = 0; k < n; ++k)
      for (auto& v : acc) v = kBf16 ? _mm512_dpbf16_ps(v, x, y) : _mm512_fmadd_ps(v, m, c);
    for (auto& v : acc) asm volatile("" : : "v"(v));
  });
}

}  // namespace

int main() {
  for (int round = 0; round < 3; ++round) {
    const double peak = vpdpbusd_with<0>(kIterations), mul = vpdpbusd_with<1>(kIterations);
    const double cvt = vpdpbusd_with<2>(kIterations), ints = vpdpbusd_with<3>(kIterations);
    std::printf("round %d, G zmm vpdpbusd / s (share of the vpdpbusd-only rate):\n", round + 1);
    std::printf("  alone %.2f; with 2 vmulps per 8: %.2f (%.0f %%); with 2 vcvtdq2ps: %.2f (%.0f %%); "
                "with 4 integer adds / shifts: %.2f (%.0f %%)\n",
                peak, mul, 100 * mul / peak, cvt, 100 * cvt / peak, ints, 100 * ints / peak);
    const double plain = tile_loop<false>(kIterations), fetched = tile_loop<true>(kIterations);
    std::printf("  one-digit tile loop from L1: %.2f (%.0f %%), with the next tile's prefetch %.2f (%.0f %%)\n", plain,
                100 * plain / peak, fetched, 100 * fetched / peak);
    const double scaled = epilogue_loop<false>(kIterations / 8), shifted = epilogue_loop<true>(kIterations / 8);
    std::printf("  one-digit group of 64 vpdpbusd + 8 epilogues: scale multiply %.2f (%.0f %%), shift %.2f (%.0f %%)\n",
                scaled, 100 * scaled / peak, shifted, 100 * shifted / peak);
    const double f32 = fma_rate<false>(kIterations), bf16 = fma_rate<true>(kIterations);
    std::printf("  G zmm vfmadd231ps / s %.2f (%.1f GMAC/s f32); vdpbf16ps %.2f (%.1f GMAC/s bf16)\n", f32,
                16 * f32, bf16, 32 * bf16);
  }
}
