// What fast prefill's bf16 tiles cost on an AMX core, part by part (docs/performance.md, sixteenth
// round): the 2 x 2 tdpbf16ps loop of csrc/kernels/kernels_amx.cpp (two token tiles x two blocks) with
// its operands in L1 or streamed from L2, in one pass or in passes whose sums are stored and reloaded;
// then the weights' bf16 conversion alone (two ways) and interleaved with the tile loop. Made-up data.
// Linux only (the tile state is requested from the kernel). Not part of the package:
//
//   g++ -O2 -std=c++17 -mavx512f -mavx512bw -mavx512bf16 -mavx512vl -mamx-tile -mamx-bf16
//       tools/bf16_tile_probe.cpp -o /tmp/bf16_tile_probe   (one command)
//   /tmp/bf16_tile_probe
//
// Figures are ns per 16 x 16 x 32 tdpbf16ps ("dp"), or ns per loop.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void* buffer(size_t bytes, uint16_t fill) {
  auto* p = static_cast<uint16_t*>(aligned_alloc(64, (bytes + 63) / 64 * 64));
  for (size_t i = 0; i < bytes / 2; ++i) p[i] = static_cast<uint16_t>(fill + i % 7);  // bf16 near 1
  return p;
}

alignas(64) float sink[4][16][16];

// Token-tile pairs x block pairs x steps of the 2 x 2 loop, as the kernel runs a chunk: the activations
// `pitch` lines a row (the kernel's acts_pitch), the weights' tiles streamed (tileloaddt1), 1 KiB per
// block and step. kSpill: the sums start from and go back to memory (the kernel's passes).
template <bool kSpill>
double tiles(int steps, int blocks, int pitch, int token_pairs, int repeats) {
  const auto* b_all = static_cast<const char*>(buffer(size_t(steps) * blocks * 1024, 0x3f80));
  const auto* a_all = static_cast<const char*>(buffer(size_t(token_pairs) * 32 * pitch * 64, 0x3f00));
  auto* partial = static_cast<float*>(buffer(size_t(token_pairs) * blocks * 4096, 0));  // 4 KiB per (pair, block)
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const double start = now();
    for (int tp = 0; tp < token_pairs; ++tp) {
      const char* a = a_all + size_t(tp) * 32 * pitch * 64;
      for (int b = 0; b < blocks; b += 2) {
        const char* b0 = b_all + size_t(b) * steps * 1024;
        const char* b1 = b0 + size_t(steps) * 1024;
        float* p = partial + (size_t(tp) * blocks + b) * 1024;
        if (kSpill) {
          _tile_loadd(4, p, 64); _tile_loadd(5, p + 256, 64); _tile_loadd(6, p + 512, 64); _tile_loadd(7, p + 768, 64);
        } else {
          _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
        }
        for (int s = 0; s < steps; ++s) {
          _tile_loadd(0, a + s * 64, pitch * 64);
          _tile_loadd(1, a + 16 * pitch * 64 + s * 64, pitch * 64);
          _tile_stream_loadd(2, b0 + s * 1024, 64);
          _tile_stream_loadd(3, b1 + s * 1024, 64);
          _tile_dpbf16ps(4, 0, 2); _tile_dpbf16ps(5, 0, 3); _tile_dpbf16ps(6, 1, 2); _tile_dpbf16ps(7, 1, 3);
        }
        float* out[4] = {sink[0][0], sink[1][0], sink[2][0], sink[3][0]};
        if (kSpill) out[0] = p, out[1] = p + 256, out[2] = p + 512, out[3] = p + 768;
        _tile_stored(4, out[0], 64); _tile_stored(5, out[1], 64); _tile_stored(6, out[2], 64); _tile_stored(7, out[3], 64);
      }
    }
    const double t = now() - start;
    best = t < best ? t : best;
  }
  free(const_cast<char*>(b_all)), free(const_cast<char*>(a_all)), free(partial);
  return best * 1e9 / (double(token_pairs) * blocks * steps * 2);
}

constexpr int kQuads = 8192;
alignas(64) uint8_t stored[kQuads * 64];
alignas(64) __m512i converted[kQuads * 2];
alignas(64) uint16_t small_a[32 * 8 * 32], small_b[2 * 8 * 512];

// kSteps steps of the 2 x 2 loop from L1 (16 dp per 4 steps) and, after them, kQuads_ quads of stored
// weights converted to bf16 tile rows: kWidened as the kernel does (a quarter of a quad at a time,
// fma(u, s, -128 s), two dword permutes), else by shifting each weight's byte out in place.
template <int kSteps, int kConverted, bool kWidened>
double interleaved(long iterations) {
  alignas(64) float scales[16];
  for (int i = 0; i < 16; ++i) scales[i] = 0.01f * float(1 + i % 5);
  const __m512 ws = _mm512_load_ps(scales);
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) uint16_t order[32];
  for (int n = 0; n < 16; ++n) order[2 * n] = uint16_t(n), order[2 * n + 1] = uint16_t(16 + n);
  const __m512i pairs = _mm512_load_si512(order);
  __m512 quarter_scale[4], quarter_offset[4];
  for (int r = 0; r < 4; ++r) {
    alignas(64) int32_t rows[16];
    for (int l = 0; l < 16; ++l) rows[l] = 4 * r + l / 4;
    quarter_scale[r] = _mm512_permutexvar_ps(_mm512_load_si512(rows), ws);
    quarter_offset[r] = _mm512_mul_ps(quarter_scale[r], _mm512_set1_ps(-128.f));
  }
  alignas(64) int32_t first[16], second[16];
  for (int n = 0; n < 16; ++n) first[n] = (n < 8 ? 0 : 16) + 2 * (n % 8), second[n] = first[n] + 1;
  const __m512i pair0 = _mm512_load_si512(first), pair1 = _mm512_load_si512(second);
  int q = 0;
  const double start = now();
  for (long it = 0; it < iterations; ++it) {
    for (int s = 0; s < kSteps; ++s) {
      _tile_loadd(0, small_a + s * 32, 8 * 64);
      _tile_loadd(1, small_a + 16 * 256 + s * 32, 8 * 64);
      _tile_loadd(2, small_b + s * 512, 64);
      _tile_loadd(3, small_b + 4096 + s * 512, 64);
      _tile_dpbf16ps(4, 0, 2); _tile_dpbf16ps(5, 0, 3); _tile_dpbf16ps(6, 1, 2); _tile_dpbf16ps(7, 1, 3);
    }
    for (int v = 0; v < kConverted; ++v, q = (q + 1) % kQuads) {
      const uint8_t* quad = stored + q * 64;
      if (kWidened) {
        const auto quarter = [&](int r) {
          const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quad + 16 * r)));
          return _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), quarter_scale[r], quarter_offset[r]);
        };
        const __m512i lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(quarter(1), quarter(0)));
        const __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(quarter(3), quarter(2)));
        converted[2 * q] = _mm512_permutex2var_epi32(lo, pair0, hi);
        converted[2 * q + 1] = _mm512_permutex2var_epi32(lo, pair1, hi);
      } else {
        const __m512i d = _mm512_xor_si512(_mm512_loadu_si512(quad), bias);
        const auto input = [&](int i) {
          return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(d, 24 - 8 * i), 24)), ws);
        };
        converted[2 * q] = _mm512_permutexvar_epi16(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(input(1), input(0))));
        converted[2 * q + 1] =
            _mm512_permutexvar_epi16(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(input(3), input(2))));
      }
    }
    // The converted rows are kept, as the kernel's are: the stores may not be dropped.
    __asm__ volatile("" : : "r"(converted) : "memory");
  }
  const double t = now() - start;
  _tile_stored(4, sink[0][0], 64);
  return t * 1e9 / double(iterations);
}

}  // namespace

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::puts("the kernel grants no AMX tile state");
    return 1;
  }
  for (int i = 0; i < kQuads * 64; ++i) stored[i] = static_cast<uint8_t>(i * 37);
  for (auto& v : small_a) v = 0x3f80;
  for (auto& v : small_b) v = 0x3f80;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  std::printf("2 x 2 tiles, ns per dp (the kernel's chunk: 4 token-tile pairs, 128 tokens)\n");
  std::printf("  operands in L1 (4 steps, 2 blocks)                  %6.2f\n", tiles<false>(4, 2, 5, 1, 200000));
  std::printf("  64 steps (2,048 inputs), 8 blocks, pitch 64 lines  %6.2f\n", tiles<false>(64, 8, 64, 4, 300));
  std::printf("  64 steps, 8 blocks, pitch 65 lines                 %6.2f\n", tiles<false>(64, 8, 65, 4, 300));
  std::printf("  a pass of 18 steps, 28 blocks, pitch 19            %6.2f\n", tiles<false>(18, 28, 19, 4, 300));
  std::printf("  the same, sums reloaded and stored (passes)        %6.2f\n", tiles<true>(18, 28, 19, 4, 300));
  std::printf("  a pass of 16 of 64 steps, pitch 65, sums spilled   %6.2f\n", tiles<true>(16, 32, 65, 4, 300));
  std::printf("conversion and tiles from L1, ns per loop (16 dp = 4 steps)\n");
  std::printf("  16 dp alone                                         %6.1f\n", interleaved<4, 0, true>(200000));
  std::printf("  16 quads converted alone, shifted / widened         %6.1f / %.1f\n", interleaved<0, 16, false>(100000),
              interleaved<0, 16, true>(100000));
  std::printf("  16 dp + 4 quads, shifted / widened                  %6.1f / %.1f\n", interleaved<4, 4, false>(100000),
              interleaved<4, 4, true>(100000));
  std::printf("  16 dp + 16 quads (128 tokens' ratio), shifted / widened %.1f / %.1f\n", interleaved<4, 16, false>(100000),
              interleaved<4, 16, true>(100000));
  _tile_release();
  return 0;
}
