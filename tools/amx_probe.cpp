// What the amx kernel path's tile of 16 tokens x 16 rows x 32 inputs costs, part by part, from L1 and
// registers (csrc/kernels/kernels_amx.cpp cites it): the tile work (zero, load B and A, tdpbssd), the
// vector work that scales a group's sums (from registers), both in one loop, and both with the tile
// store and the sums reloaded right after it or one group later, as the kernel does (with the digits'
// join in int32 or in float); the parts alone; then a tdpbssd over 64 inputs instead of 32, and
// ldtilecfg. Made-up data (zeros time quicker). Linux only (the tile state is requested from the kernel).
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512dq -mamx-tile -mamx-int8 tools/amx_probe.cpp -o /tmp/amx_probe
//   /tmp/amx_probe
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kGroups = 18;  // SmolLM2's 576 inputs in groups of 32
alignas(64) int8_t acts[16 * 1152];
alignas(64) uint8_t weights[kGroups * 576];
alignas(64) int32_t sums[2][16][16];
alignas(64) float token_scales[16 * kGroups];

// The kernel's tile store: its output named, so that the accumulators stay in registers.
#define STORE(TILE, BUF)                                                                              \
  __asm__ volatile("tilestored %%tmm" #TILE ", (%1,%2,1)"                                            \
                   : "=m"(*reinterpret_cast<int32_t(*)[256]>(BUF)) : "r"(static_cast<void*>(BUF)), \
                     "r"(64L))

template <class F>
void report(const char* what, long iterations, F&& body) {
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < iterations; ++i) body();
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  std::printf("%-52s %6.2f ns per group\n", what, ns / iterations / kGroups);
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    std::puts("the OS grants no AMX tile state to this process");
    return 1;
  }
  TileConfig cfg;
  cfg.rows[0] = 16, cfg.colsb[0] = 32;  // A: 16 tokens x 32 digits
  cfg.rows[1] = 16, cfg.colsb[1] = 64;  // A over 64 inputs
  cfg.rows[2] = 8, cfg.colsb[2] = 64;   // B: 8 quads
  cfg.rows[3] = 16, cfg.colsb[3] = 64;  // B over 64 inputs
  for (int t = 4; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;  // sums
  _tile_loadconfig(&cfg);
  for (int i = 0; i < 16 * kGroups; ++i) token_scales[i] = 1.0f + i * 1e-3f;
  // Made-up digits, weights and scales: the unit's timing may depend on the data (zeros are quick).
  uint32_t state = 12345;
  const auto next = [&state] { return state = state * 1664525u + 1013904223u; };
  for (auto& v : acts) v = static_cast<int8_t>(next() >> 24);
  for (int g = 0; g < kGroups; ++g) {
    for (int i = 0; i < 512; ++i) weights[g * 576 + i] = static_cast<uint8_t>(next() >> 24);
    for (int i = 0; i < 16; ++i) reinterpret_cast<float*>(weights + g * 576 + 512)[i] = 1e-3f * (1 + i);
  }
  const long n = 400000;
  __m512 a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15;
  a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = _mm512_setzero_ps();
  // One group's scaling of 16 tokens' sums, `sum(r)` giving token r's 16 int32 sums; the 16 float sums
  // are named variables, so that they stay in registers.
#define ROW(g, sum, r, acc)                                                                             \
  do {                                                                                                  \
    const __m512i h = sum(g, r);                                                                        \
    const __m512i isum = _mm512_sub_epi32(_mm512_slli_epi32(h, 7), h);                                 \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(ws, _mm512_set1_ps(xs[(r) * kGroups])), acc); \
  } while (0)
// The same with 127 * hi taken in float: cvt(hi) is exact (|hi| < 2^24) and the product rounds once, as
// cvt(127 * hi) does, so the bits are the integer join's with one vector instruction fewer.
#define ROW_F(g, sum, r, acc)                                                                           \
  do {                                                                                                  \
    const __m512 h = _mm512_mul_ps(_mm512_cvtepi32_ps(sum(g, r)), _mm512_set1_ps(127.f));               \
    acc = _mm512_fmadd_ps(h, _mm512_mul_ps(ws, _mm512_set1_ps(xs[(r) * kGroups])), acc);               \
  } while (0)
#define SCALE(g, sum) SCALE_WITH(g, sum, ROW)
#define SCALE_F(g, sum) SCALE_WITH(g, sum, ROW_F)
#define SCALE_WITH(g, sum, ROW)                                                                         \
  do {                                                                                                  \
    const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(weights + (g) * 576 + 512));      \
    const float* xs = token_scales + (g);                                                               \
    ROW(g, sum, 0, a0); ROW(g, sum, 1, a1); ROW(g, sum, 2, a2); ROW(g, sum, 3, a3);                     \
    ROW(g, sum, 4, a4); ROW(g, sum, 5, a5); ROW(g, sum, 6, a6); ROW(g, sum, 7, a7);                     \
    ROW(g, sum, 8, a8); ROW(g, sum, 9, a9); ROW(g, sum, 10, a10); ROW(g, sum, 11, a11);                 \
    ROW(g, sum, 12, a12); ROW(g, sum, 13, a13); ROW(g, sum, 14, a14); ROW(g, sum, 15, a15);             \
  } while (0)
#define FROM_REGISTERS(g, r) _mm512_set1_epi32((g) + (r))
#define FROM_STORE(g, r) _mm512_load_si512(sums[(g) & 1][r])
#define TILE(g, C)                                       \
  do {                                                   \
    _tile_zero(C);                                       \
    _tile_loadd(2, weights + (g) * 576, 64);             \
    _tile_loadd(0, acts + (g) * 32, 1152);               \
    _tile_dpbssd(C, 0, 2);                               \
  } while (0)
  report("tile work (zero, load B and A, tdpbssd)", n, [&] {
    for (int g = 0; g < kGroups; ++g) TILE(g, 4);
  });
  report("scaling from registers", n, [&] {
    for (int g = 0; g < kGroups; ++g) SCALE(g, FROM_REGISTERS);
  });
  report("both", n, [&] {
    for (int g = 0; g < kGroups; ++g) {
      TILE(g, 4);
      SCALE(g, FROM_REGISTERS);
    }
  });
  // Group g's tile work and the store of its sums, into two sums in turn.
#define TILE_STORED(g)         \
  do {                         \
    if ((g) & 1) {             \
      TILE(g, 5);              \
      STORE(5, sums[1]);       \
    } else {                   \
      TILE(g, 4);              \
      STORE(4, sums[0]);       \
    }                          \
  } while (0)
  report("both, with the tile store and the sums reloaded", n, [&] {
    for (int g = 0; g < kGroups; ++g) {
      TILE_STORED(g);
      SCALE(g, FROM_STORE);
    }
  });
  // The same, but a group's sums reloaded one group after their store (group g - 1 scaled after group
  // g's store): the reload then does not wait on the store.
#define LAGGED(SCALE_WITH_SUMS)                                 \
  for (int g = 0; g <= kGroups; ++g) {                          \
    if (g < kGroups) TILE_STORED(g);                            \
    if (g > 0) SCALE_WITH_SUMS(g - 1, FROM_STORE);              \
  }
  report("both, the sums reloaded one group after their store", n, [&] { LAGGED(SCALE) });
  report("the same, 127 * hi in float", n, [&] { LAGGED(SCALE_F) });
  report("scaling from memory, 127 * hi in float", n, [&] {
    for (int g = 0; g < kGroups; ++g) SCALE_F(g, FROM_STORE);
  });
  report("kernel order: store g, tile g + 1, scale g - 1", n, [&] {
    TILE(0, 4);
    for (int g = 0; g <= kGroups; ++g) {
      if (g < kGroups) {
        if (g & 1) {
          STORE(5, sums[1]);
          if (g + 1 < kGroups) TILE(g + 1, 4);
        } else {
          STORE(4, sums[0]);
          if (g + 1 < kGroups) TILE(g + 1, 5);
        }
      }
      if (g > 0) SCALE_F(g - 1, FROM_STORE);
    }
  });
  report("tile store alone", n, [&] {
    for (int g = 0; g < kGroups; ++g) {
      if (g & 1) STORE(5, sums[1]); else STORE(4, sums[0]);
    }
  });
  report("scaling from memory, no stores", n, [&] {
    for (int g = 0; g < kGroups; ++g) SCALE(g, FROM_STORE);
  });
  report("tile work and store, no scaling", n, [&] {
    for (int g = 0; g < kGroups; ++g) {
      if (g & 1) { TILE(g, 5); STORE(5, sums[1]); } else { TILE(g, 4); STORE(4, sums[0]); }
    }
  });
  // One tdpbssd per group, into two sums in turn.
  report("tdpbssd alone, 32 inputs", n, [&] {
    for (int g = 0; g < kGroups; g += 2) {
      _tile_dpbssd(4, 0, 2);
      _tile_dpbssd(5, 0, 2);
    }
  });
  report("tdpbssd alone, 64 inputs", n, [&] {
    for (int g = 0; g < kGroups; g += 2) {
      _tile_dpbssd(4, 1, 3);
      _tile_dpbssd(5, 1, 3);
    }
  });
  report("ldtilecfg", n / 10, [&] {
    for (int g = 0; g < kGroups; ++g) _tile_loadconfig(&cfg);
  });
  _tile_release();
  const __m512 all = _mm512_add_ps(
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                    _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7))),
      _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)),
                    _mm512_add_ps(_mm512_add_ps(a12, a13), _mm512_add_ps(a14, a15))));
  std::printf("(checksum %g)\n", _mm512_reduce_add_ps(all));
  return 0;
}
