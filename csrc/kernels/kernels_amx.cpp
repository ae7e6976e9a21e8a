// AMX (Sapphire Rapids and later Xeons): the AVX512-BF16 path, with the int8 matmul of prompts on the
// tile unit. Compiled with -mamx-tile -mamx-int8; only called after dispatch has checked the CPU and the
// OS has granted this process the tile state (cpu/features.cpp).
//
// The packed weights (Q8Weights in kernels.h) are already what a tile multiply takes as its second
// operand: a 64-byte quad holds 4 consecutive inputs of each of a block's 16 rows, so a group's quads
// are the rows of a B tile, and one tdpbssd of 16 tokens' digits against them gives a 16 x 16 block
// of the group's integer sums, where vpdpbusd needs one instruction per token and quad. The vector
// unit then joins and scales each group's sums as the VNNI tiles do, so the results are theirs bit for
// bit. On the Xeon this was written on, the tile and vector work did not overlap (tools/amx_probe.cpp:
// per group of 16 x 16 x 32, the tile work alone 4.9 ns, the scaling from registers 13.2, both 19.4),
// so both are kept short: the weights are copied, a chunk of 256 KiB at a time, with the stored w + 128
// turned back into signed bytes, so that no sum(x) correction is due. Tokens past the last whole tile
// of 16 go to the VNNI matmul: a tile's rows are fixed by its configuration, and loading one (ldtilecfg)
// costs ~45 ns.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "kernels/kernels.h"

namespace cpullm {
namespace {

constexpr int kTileTokens = 16;
static_assert(kQ8Rows == 16, "a C tile row is one block's 16 rows");
// A tile row holds at most 64 bytes: a group is multiplied in pieces of 16 quads, or of 8 where its
// quads are not a multiple of 16 (every group's are a multiple of 8: group % kQ8Block == 0).
constexpr int64_t kPieceQuads = 16;

// The tiles, by number. Macros, not constants: the tile intrinsics paste their operands' spelling
// into the instruction. A of the hi and lo digits and B of the weights for a piece; the two digits'
// sums twice over, so that a group's products run on the tile unit while the vector unit scales the
// group before; and, for a last group of another length, A and B of its short piece.
#define kAHi 0
#define kALo 1
#define kB 2
#define kCHi0 3
#define kCLo0 4
#define kCHi1 5
#define kCLo1 6
#define kAHiShort 5
#define kALoShort 6
#define kBShort 7

// tilestored with the bytes it writes as its output: the intrinsic's "memory" clobber would make the
// compiler keep the float accumulators in memory, storing and reloading all 16 per group.
#define CPULLM_TILE_STORE(TILE, BUF) CPULLM_TILE_STORE_(TILE, BUF)
#define CPULLM_TILE_STORE_(TILE, BUF)                                                         \
  __asm__ volatile("tilestored %%tmm" #TILE ", (%1,%2,1)"                                    \
                   : "=m"(*reinterpret_cast<int32_t(*)[kTileTokens * 16]>(BUF))              \
                   : "r"(static_cast<void*>(BUF)), "r"(static_cast<long>(64)))

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int64_t n_rows, int64_t bytes_per_row) {
    rows[tile] = static_cast<uint8_t>(n_rows);
    colsb[tile] = static_cast<uint16_t>(bytes_per_row);
  }
  // A of 16 tokens x 4 * quads digits, B of quads rows of 64 bytes.
  void set_piece(int a_hi, int a_lo, int b, int64_t quads) {
    set(a_hi, kTileTokens, 4 * quads);
    set(a_lo, kTileTokens, 4 * quads);
    set(b, quads, 64);
  }
};

// How a matrix's groups are cut into pieces, and the configurations that multiply them: `main` for
// every group whose quads are whole pieces, with both sets of sums; `last` for a last group that ends
// in a shorter piece, with one set of sums and the short piece in the other's place.
struct TilePlan {
  int64_t piece, full_quads, short_quads, full_pieces, last_pieces;
  TileConfig main, last;
  explicit TilePlan(const Q8Weights& w)
      : piece(w.group / 4 % kPieceQuads == 0 ? kPieceQuads : kPieceQuads / 2),
        full_quads(w.group / 4),
        short_quads(w.last_quads % piece),
        full_pieces(full_quads / piece),
        last_pieces(w.last_quads / piece) {
    for (TileConfig* c : {&main, &last}) {
      c->set_piece(kAHi, kALo, kB, piece);
      c->set(kCHi0, kTileTokens, 64);
      c->set(kCLo0, kTileTokens, 64);
    }
    main.set(kCHi1, kTileTokens, 64);
    main.set(kCLo1, kTileTokens, 64);
    if (short_quads > 0) last.set_piece(kAHiShort, kALoShort, kBShort, short_quads);
  }
};

// One group's products for a tile of 16 tokens, accumulated over its whole pieces into CHI (and with
// kLo CLO): the hi (lo) digits' integer sums against the group's quads. The tile numbers are pasted in.
#define CPULLM_GROUP_PRODUCTS(NAME, CHI, CLO)                                                            \
  template <bool kLo>                                                                                    \
  inline void NAME(const int8_t* a, int64_t a_stride, int64_t lo_offset, const uint8_t* b, int64_t pieces, \
                   int64_t piece) {                                                                      \
    _tile_zero(CHI);                                                                                     \
    if constexpr (kLo) _tile_zero(CLO);                                                                  \
    for (int64_t p = 0; p < pieces; ++p) {                                                               \
      _tile_loadd(kB, b + p * piece * 64, 64);                                                           \
      _tile_loadd(kAHi, a + 4 * p * piece, a_stride);                                                    \
      _tile_dpbssd(CHI, kAHi, kB);                                                                       \
      if constexpr (kLo) {                                                                               \
        _tile_loadd(kALo, a + lo_offset + 4 * p * piece, a_stride);                                      \
        _tile_dpbssd(CLO, kALo, kB);                                                                     \
      }                                                                                                  \
    }                                                                                                    \
  }                                                                                                      \
  template <bool kLo>                                                                                    \
  inline void NAME##_store(int32_t (*c)[kTileTokens][16]) {                                              \
    CPULLM_TILE_STORE(CHI, c[0]);                                                                        \
    if constexpr (kLo) CPULLM_TILE_STORE(CLO, c[1]);                                                     \
  }
CPULLM_GROUP_PRODUCTS(products0, kCHi0, kCLo0)
CPULLM_GROUP_PRODUCTS(products1, kCHi1, kCLo1)
#undef CPULLM_GROUP_PRODUCTS

// acc[r] += the group's sums c (hi, and with kLo lo) for token r, joined as 127 * hi + lo and scaled,
// with the VNNI tiles' bits (a row's result must not depend on the rows it is computed with: decode,
// chunked prompts and the token split over threads all give the same bits as one pass). They join in
// int32 and convert; here the join is in float, one vector instruction fewer per row where the vector
// unit is what bounds the tile (tools/amx_probe.cpp: 15.1 -> 10.4 ns per one-digit group; with the
// reload one group later, tools/kernel_bench.py on SmolLM2's shapes: 44-50 -> 48-53 % of the VNNI
// peak for two digits, 66-67 -> 67-73 % for one), with the same bits: each digit's sum converts exactly (|sum| <= 32 * 127 * 127 < 2^24), so 127 * hi (+ lo),
// rounded once by the multiply (fma), is the join's exact integer rounded once, as its conversion is.
template <bool kLo>
inline void scale_group(const int32_t (*c)[kTileTokens][16], const uint8_t* group_scales, const float* scales,
                        int64_t stride, __m512* acc) {
  const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(group_scales));
  const __m512 base = _mm512_set1_ps(127.f);
#pragma GCC unroll 16
  for (int r = 0; r < kTileTokens; ++r) {
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(c[0][r]));
    const __m512 sum = kLo ? _mm512_fmadd_ps(hi, base, _mm512_cvtepi32_ps(_mm512_load_si512(c[1][r])))
                           : _mm512_mul_ps(hi, base);
    const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(scales[r * stride]));
    acc[r] = _mm512_fmadd_ps(sum, s, acc[r]);
  }
}

// Tokens [t0, t0 + 16) x row block b of w (signed weights). kLo false: rows whose lo digits are zero
// (one-digit rows), whose products are skipped. The groups run two deep: group g + 1's products are
// issued before group g is scaled.
template <bool kLo>
void amx_tile(const Q8Acts& x, int64_t t0, const Q8Weights& w, int64_t b, const TilePlan& plan, float* y,
              int64_t ldy, int64_t rows_left) {
  const int64_t G = w.n_groups;
  const uint8_t* blk = w.data + b * w.block_bytes;
  const int8_t* a = x.q + t0 * 2 * x.stride;
  const int64_t a_stride = 2 * x.stride;
  const float* scales = x.scales + t0 * G;
  alignas(64) int32_t c[2][2][kTileTokens][16];  // [group parity][hi, lo][token][row]
  __m512 acc[kTileTokens];
#pragma GCC unroll 16
  for (int r = 0; r < kTileTokens; ++r) acc[r] = _mm512_setzero_ps();
  const auto quads = [&](int64_t g) { return g + 1 == G ? w.last_quads : plan.full_quads; };
  const auto issue = [&](int64_t g) {
    const int64_t pieces = g + 1 == G ? plan.last_pieces : plan.full_pieces;
    if (g & 1)
      products1<kLo>(a + g * w.group, a_stride, x.stride, blk + g * w.group_bytes, pieces, plan.piece);
    else
      products0<kLo>(a + g * w.group, a_stride, x.stride, blk + g * w.group_bytes, pieces, plan.piece);
  };
  // The groups on the main configuration: all of them, or all but a last one with a short piece.
  const int64_t n_main = plan.short_quads > 0 ? G - 1 : G;
  // A group's sums are reloaded one group after their store (group g - 1 is scaled after group g's
  // store), so the loads do not wait on it: 31 -> 27 ns per one-digit group (tools/amx_probe.cpp).
  // One scaling in the loop, not one per case: with more, GCC kept the accumulators in memory.
  if (n_main > 0) issue(0);
  for (int64_t g = 0; g <= G; ++g) {
    if (g < n_main) {
      if (g & 1)
        products1_store<kLo>(c[1]);
      else
        products0_store<kLo>(c[0]);
      if (g + 1 < n_main) issue(g + 1);
    } else if (g < G) {
      // The last group, with a short piece, on the other configuration (which zeroes the tiles: group
      // g - 1's sums are in memory already), into the first set of sums.
      const int64_t whole = plan.last_pieces * plan.piece;
      const uint8_t* rec = blk + g * w.group_bytes;
      _tile_loadconfig(&plan.last);
      products0<kLo>(a + g * w.group, a_stride, x.stride, rec, plan.last_pieces, plan.piece);
      _tile_loadd(kBShort, rec + whole * 64, 64);
      _tile_loadd(kAHiShort, a + g * w.group + 4 * whole, a_stride);
      _tile_dpbssd(kCHi0, kAHiShort, kBShort);
      if constexpr (kLo) {
        _tile_loadd(kALoShort, a + g * w.group + x.stride + 4 * whole, a_stride);
        _tile_dpbssd(kCLo0, kALoShort, kBShort);
      }
      products0_store<kLo>(c[g & 1]);
    }
    if (g > 0) {
      const int64_t p = g - 1;
      scale_group<kLo>(c[p & 1], blk + p * w.group_bytes + quads(p) * 64, scales + p, G, acc);
    }
  }
  if (n_main < G) _tile_loadconfig(&plan.main);
  const __mmask16 mask = rows_left >= kQ8Rows ? __mmask16(0xffff) : static_cast<__mmask16>((1u << rows_left) - 1u);
#pragma GCC unroll 16
  for (int r = 0; r < kTileTokens; ++r) _mm512_mask_storeu_ps(y + (t0 + r) * ldy, mask, acc[r]);
}

// The VNNI path's int8 matmul, for what the tiles leave: decode, and a prompt's tokens past its last
// whole tile. With software prefetch for decode's one stream, which paid on the Xeon this was written on.
constexpr auto vnni_matmul = &matmul_q8_avx512vnni_prefetching;

// Blocks [b0, b1) of w with the stored bytes w + 128 back to signed w, scales as they are, into out.
void copy_signed(const Q8Weights& w, int64_t b0, int64_t b1, uint8_t* out) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const uint8_t* in = w.data + b0 * w.block_bytes;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const int64_t quads = g + 1 == w.n_groups ? w.last_quads : w.group / 4;
      for (int64_t i = 0; i < quads; ++i, in += 64, out += 64)
        _mm512_store_si512(out, _mm512_xor_si512(_mm512_loadu_si512(in), bias));
      std::memcpy(out, in, 64);
      in += 64;
      out += 64;
    }
}

// Bytes of weights a thread copies at a time, which every token tile then re-reads from L2. With the
// next chunk requested while a chunk's tiles run, 256 KiB chunks pre-filled SmolLM2 3-8 % faster than
// 1 MiB ones without the requests (tools/ab_forward.py, 1 and 2 threads; 1 MiB with them: no change).
constexpr int64_t kChunkBytes = int64_t(1) << 18;

void matmul_q8(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
  const int64_t tiled = x.T / kTileTokens * kTileTokens;
  if (tiled > 0 && b0 < b1) {
    const int64_t chunk = std::max<int64_t>(1, kChunkBytes / w.block_bytes);
    // Grown once per thread to the largest chunk it has met, then reused: no allocation per call.
    thread_local std::vector<__m512i> scratch;
    const size_t needed = size_t(std::min(chunk, b1 - b0) * w.block_bytes / 64);
    if (scratch.size() < needed) scratch.resize(needed);
    Q8Weights copy = w;
    copy.data = reinterpret_cast<const uint8_t*>(scratch.data());
    const TilePlan plan(w);
    _tile_loadconfig(&plan.main);
    const int64_t token_tiles = tiled / kTileTokens;
    for (int64_t cb = b0; cb < b1; cb += chunk) {
      const int64_t ce = std::min(b1, cb + chunk);
      copy_signed(w, cb, ce, reinterpret_cast<uint8_t*>(scratch.data()));
      // The next chunk's bytes, requested toward L2 a few lines per tile while this chunk's tiles run,
      // so that its copy does not wait on memory.
      const char* next = reinterpret_cast<const char*>(w.data + ce * w.block_bytes);
      const int64_t next_bytes = (std::min(b1, ce + chunk) - ce) * w.block_bytes;
      const int64_t lines_per_tile = (next_bytes / 64 + token_tiles * (ce - cb) - 1) / (token_tiles * (ce - cb));
      int64_t next_pos = 0;
      // The tile loads' asm does not name the memory it reads: the copy must be in memory before them.
      __asm__ volatile("" ::: "memory");
      for (int64_t t = 0; t < tiled; t += kTileTokens) {
        // A tile that reaches past the one-digit rows takes both digits (zero lo digits add nothing).
        const bool one_digit = t + kTileTokens <= x.one_digit_rows;
        for (int64_t b = cb; b < ce; ++b) {
          for (int64_t i = 0; i < lines_per_tile && next_pos < next_bytes; ++i, next_pos += 64)
            _mm_prefetch(next + next_pos, _MM_HINT_T1);
          // The copy holds blocks [cb, ce): block b at b - cb.
          float* out = y + b * kQ8Rows;
          if (one_digit)
            amx_tile<false>(x, t, copy, b - cb, plan, out, ldy, w.rows - b * kQ8Rows);
          else
            amx_tile<true>(x, t, copy, b - cb, plan, out, ldy, w.rows - b * kQ8Rows);
        }
      }
    }
    // Leaves the tile state at its initial (empty) state: a thread that holds none saves none on a
    // context switch.
    _tile_release();
  }
  if (tiled < x.T) vnni_matmul(q8_acts_rows(x, tiled, x.T, w.n_groups), w, b0, b1, y + tiled * ldy, ldy);
}

#undef CPULLM_TILE_STORE
#undef CPULLM_TILE_STORE_
#undef kAHi
#undef kALo
#undef kB
#undef kCHi0
#undef kCLo0
#undef kCHi1
#undef kCLo1
#undef kAHiShort
#undef kALoShort
#undef kBShort

}  // namespace

const Kernels& kernels_amx() {
  static const Kernels table = [] {
    Kernels k = kernels_avx512bf16();
    k.name = "amx";
    // The prompt's matmul reads quantize_q8's layout, as the VNNI tiles it leaves its remainder to.
    set_matmul_q8(k, &matmul_q8);
    // Decode over f32 / bf16 weights reads ahead too (kernels_impl.h, one_token_rows).
    k.matmul_f32 = &matmul_f32_avx512_ahead;
    k.matmul_bf16 = &matmul_bf16_avx512_ahead;
    return k;
  }();
  return table;
}

}  // namespace cpullm
