// AMX (Sapphire Rapids and later Xeons): the AVX512-BF16 path, with the int8 matmul of prompts on the
// tile unit. Compiled with -mamx-tile -mamx-int8 -mamx-bf16; only called after dispatch has checked the
// CPU and the OS has granted this process the tile state (cpu/features.cpp).
//
// Two-digit rows (the default's prompts) on int8 tiles. The packed weights (Q8Weights in kernels.h) are
// already what a tile multiply takes as its second operand: a 64-byte quad holds 4 consecutive inputs
// of each of a block's 16 rows, so a group's quads are the rows of a B tile, and one tdpbssd of 16
// tokens' digits against them gives a 16 x 16 block of the group's integer sums, where vpdpbusd needs
// one instruction per token and quad. The vector unit then joins and scales each group's sums with the
// VNNI tiles' roundings (scale_group), so the results are theirs bit for bit. On the Xeon this was written on, the tile and
// vector work did not overlap (tools/amx_probe.cpp: per group of 16 x 16 x 32, the tile work alone 4.9
// ns, the scaling from registers 13.2, both 19.4), so both are kept short: the weights are copied, a
// chunk of 256 KiB at a time, with the stored w + 128 turned back into signed bytes, so that no sum(x)
// correction is due. Tokens past the last whole tile of 16 go to the VNNI matmul: a tile's rows are
// fixed by its configuration, and loading one (ldtilecfg) costs ~45 ns.
//
// Fast prefill's rows (Kernels::quantize_fast_bf16) on bf16 tiles: with the weights' group scales
// folded into bf16 weights, tdpbf16ps sums a whole row in f32 with no per-group step, which is what
// bounds the int8 tiles.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/q8_avx512.h"

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

// One group's products for a tile of 16 tokens, accumulated over its whole pieces into CHI and CLO:
// the hi and lo digits' integer sums against the group's quads. The tile numbers are pasted in.
#define CPULLM_GROUP_PRODUCTS(NAME, CHI, CLO)                                                            \
  inline void NAME(const int8_t* a, int64_t a_stride, int64_t lo_offset, const uint8_t* b, int64_t pieces, \
                   int64_t piece) {                                                                      \
    _tile_zero(CHI);                                                                                     \
    _tile_zero(CLO);                                                                                     \
    for (int64_t p = 0; p < pieces; ++p) {                                                               \
      _tile_loadd(kB, b + p * piece * 64, 64);                                                           \
      _tile_loadd(kAHi, a + 4 * p * piece, a_stride);                                                    \
      _tile_dpbssd(CHI, kAHi, kB);                                                                       \
      _tile_loadd(kALo, a + lo_offset + 4 * p * piece, a_stride);                                        \
      _tile_dpbssd(CLO, kALo, kB);                                                                       \
    }                                                                                                    \
  }                                                                                                      \
  inline void NAME##_store(int32_t (*c)[kTileTokens][16]) {                                              \
    CPULLM_TILE_STORE(CHI, c[0]);                                                                        \
    CPULLM_TILE_STORE(CLO, c[1]);                                                                        \
  }
CPULLM_GROUP_PRODUCTS(products0, kCHi0, kCLo0)
CPULLM_GROUP_PRODUCTS(products1, kCHi1, kCLo1)
#undef CPULLM_GROUP_PRODUCTS

// acc[r] += the group's sums c (hi and lo) for token r, joined as 127 * hi + lo and scaled,
// with the VNNI tiles' bits (a row's result must not depend on the rows it is computed with: decode,
// chunked prompts and the token split over threads all give the same bits as one pass). They join in
// int32 and convert; here the join is in float, one vector instruction fewer per row where the vector
// unit is what bounds the tile (tools/amx_probe.cpp: 15.1 -> 10.4 ns per one-digit group; with the
// reload one group later, tools/kernel_bench.py on SmolLM2's shapes: 44-50 -> 48-53 % of the VNNI
// peak), with the same bits: each digit's sum converts exactly (|sum| <= 32 * 127 * 127 < 2^24), so
// 127 * hi + lo, rounded once by the fma, is the join's exact integer rounded once, as its conversion is.
inline void scale_group(const int32_t (*c)[kTileTokens][16], const uint8_t* group_scales, const float* scales,
                        int64_t stride, __m512* acc) {
  const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(group_scales));
  const __m512 base = _mm512_set1_ps(127.f);
#pragma GCC unroll 16
  for (int r = 0; r < kTileTokens; ++r) {
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(c[0][r]));
    const __m512 sum = _mm512_fmadd_ps(hi, base, _mm512_cvtepi32_ps(_mm512_load_si512(c[1][r])));
    const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(scales[r * stride]));
    acc[r] = _mm512_fmadd_ps(sum, s, acc[r]);
  }
}

// Tokens [t0, t0 + 16) x row block b of w (signed weights). The groups run two deep: group g + 1's
// products are issued before group g is scaled.
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
      products1(a + g * w.group, a_stride, x.stride, blk + g * w.group_bytes, pieces, plan.piece);
    else
      products0(a + g * w.group, a_stride, x.stride, blk + g * w.group_bytes, pieces, plan.piece);
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
        products1_store(c[1]);
      else
        products0_store(c[0]);
      if (g + 1 < n_main) issue(g + 1);
    } else if (g < G) {
      // The last group, with a short piece, on the other configuration (which zeroes the tiles: group
      // g - 1's sums are in memory already), into the first set of sums.
      const int64_t whole = plan.last_pieces * plan.piece;
      const uint8_t* rec = blk + g * w.group_bytes;
      _tile_loadconfig(&plan.last);
      products0(a + g * w.group, a_stride, x.stride, rec, plan.last_pieces, plan.piece);
      _tile_loadd(kBShort, rec + whole * 64, 64);
      _tile_loadd(kAHiShort, a + g * w.group + 4 * whole, a_stride);
      _tile_dpbssd(kCHi0, kAHiShort, kBShort);
      _tile_loadd(kALoShort, a + g * w.group + x.stride + 4 * whole, a_stride);
      _tile_dpbssd(kCLo0, kALoShort, kBShort);
      products0_store(c[g & 1]);
    }
    if (g > 0) {
      const int64_t p = g - 1;
      scale_group(c[p & 1], blk + p * w.group_bytes + quads(p) * 64, scales + p, G, acc);
    }
  }
  if (n_main < G) _tile_loadconfig(&plan.main);
  const __mmask16 mask = rows_left >= kQ8Rows ? __mmask16(0xffff) : static_cast<__mmask16>((1u << rows_left) - 1u);
#pragma GCC unroll 16
  for (int r = 0; r < kTileTokens; ++r) _mm512_mask_storeu_ps(y + (t0 + r) * ldy, mask, acc[r]);
}

// The VNNI path's int8 matmul, for what the tiles leave: decode, and a prompt's tokens past its last
// whole tile. With software prefetch and, for one token, four streams of weights, which paid on the
// Xeon this was written on (kernels_avx512vnni.cpp).
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

// Two-digit rows x blocks [b0, b1) of w.
void two_digit_rows(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
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
        for (int64_t b = cb; b < ce; ++b) {
          for (int64_t i = 0; i < lines_per_tile && next_pos < next_bytes; ++i, next_pos += 64)
            _mm_prefetch(next + next_pos, _MM_HINT_T1);
          // The copy holds blocks [cb, ce): block b at b - cb.
          amx_tile(x, t, copy, b - cb, plan, y + b * kQ8Rows, ldy, w.rows - b * kQ8Rows);
        }
      }
    }
    // Leaves the tile state at its initial (empty) state: a thread that holds none saves none on a
    // context switch.
    _tile_release();
  }
  if (tiled < x.T) vnni_matmul(q8_acts_rows(x, tiled, x.T, w.n_groups), w, b0, b1, y + tiled * ldy, ldy);
}

// ---- Fast rows on bf16 tiles ----------------------------------------------------------------------

// Inputs per tdpbf16ps: a tile row of 32 bf16 values (64 bytes).
constexpr int64_t kStep = 32;
// The tiles, by number: A of two token tiles, B of two row blocks, and the four 16 x 16 f32 sums.
#define kFA0 0
#define kFA1 1
#define kFB0 2
#define kFB1 3
#define kFC00 4
#define kFC01 5
#define kFC10 6
#define kFC11 7

TileConfig bf16_config() {
  TileConfig c;
  for (int tile = 0; tile < 8; ++tile) c.set(tile, 16, 64);
  return c;
}

// bf16 of 16 f32 values a and 16 more b, as 32 consecutive values (a first); round to nearest even.
inline __m512i bf16_pack(__m512 a, __m512 b) {
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

// Lanes [0, n) of a mask of `lanes` <= 32 (n may be out of [0, lanes]).
inline uint32_t first_lanes(int64_t n, int lanes) {
  return n <= 0 ? 0 : static_cast<uint32_t>((uint64_t(1) << std::min<int64_t>(n, lanes)) - 1);
}

// Kernels::quantize_fast_bf16: x as stride bf16 values in q's 2 * stride bytes, zero past K.
void quantize_bf16_row(const float* x, int64_t K, int64_t stride, int8_t* q) {
  for (int64_t k = 0; k < stride; k += kStep) {
    // Masked-off lanes are neither read nor written, and past K the address stays at the row's start,
    // so that no pointer leaves its buffer.
    const __mmask16 m0 = static_cast<__mmask16>(first_lanes(K - k, 16));
    const __mmask16 m1 = static_cast<__mmask16>(first_lanes(K - k - 16, 16));
    const __m512 lo = _mm512_maskz_loadu_ps(m0, x + (m0 ? k : 0));
    const __m512 hi = _mm512_maskz_loadu_ps(m1, x + (m1 ? k + 16 : 0));
    _mm512_mask_storeu_epi16(q + 2 * k, static_cast<__mmask32>(first_lanes(stride - k, 32)), bf16_pack(lo, hi));
  }
}

// The activations' row pitch in 64-byte lines: odd, so that a tile's 16 rows fall in 16 different L1
// sets. With a pitch of a multiple of 4 KiB (2,048 or 8,192 inputs) all the rows of a step share one
// set, which holds 12 of their 32 lines, and the tiles re-read the activations from L2
// (tools/ab_forward.py, fast prefill, 1 thread, 4 rounds: the 1B shape 286-310 -> 311-320 tok/s).
inline int64_t acts_pitch(int64_t steps) { return steps | 1; }

// Rows [0, x.T) of x (quantize_bf16_row's) as bf16 tile rows of steps * 32 values, acts_pitch(steps)
// lines apart (with rows across two cache lines a probe's tile loop ran at less than half the speed),
// zero past the row; rows [x.T, padded_rows) zero.
void acts_bf16(const Q8Acts& x, int64_t steps, int64_t padded_rows, __m512i* out) {
  const int64_t pitch = acts_pitch(steps);
  for (int64_t t = 0; t < padded_rows; ++t) {
    const int8_t* row = t < x.T ? x.q + 2 * t * x.stride : x.q;
    for (int64_t s = 0; s < pitch; ++s) {
      const __mmask32 m = static_cast<__mmask32>(t < x.T && s < steps ? first_lanes(x.stride - s * kStep, 32) : 0);
      out[t * pitch + s] = _mm512_maskz_loadu_epi16(m, m ? row + 2 * s * kStep : row);
    }
  }
}

// The conversion requests the stored bytes this far ahead of the quad it converts: it reads a matrix's
// bytes first, from memory or L3, and the tiles that follow leave it no time to run ahead by itself.
// tools/ab_forward.py, fast prefill, 1 thread, medians of 6 / 3 rounds: the 1B shape 210 -> 234 tok/s,
// SmolLM2 1,873 -> 1,945 (2 KiB: 238 / 2,009; 8 KiB: 241 / 1,870). Requests spread over the tiles of
// the chunk before, toward L2, slowed them (the fifteenth round in docs/performance.md).
constexpr int64_t kConvertAhead = 4096;

// The prompt's last row (two digits), summed while its weights are converted, which reads each quad
// once for both: the VNNI one-token kernel's sums (vnni_one_token_blocks) and its group step
// (add_two_digit_group), so the same bits, with the same order of additions. Per block of a chunk, its
// float sums and, for a group cut by a pass, the group's integer sums wait in `state` between passes.
struct LastRow {
  const int8_t* hi = nullptr;  // the row's hi digits; its lo digits follow `stride` bytes on
  int64_t stride = 0;
  const float* scales = nullptr;
  const int32_t* sums = nullptr;
  __m512i* state = nullptr;  // [block of the chunk][3]: float sums, hi sums, lo sums
};

// Steps [s0, s1) of blocks [b0, b1) of w as bf16 B tiles: per block and step, 16 tile rows, one per
// pair of inputs, of the 16 rows' two weights times their group's scale (zero past the group's quads),
// 1 KiB in all. With kLast, the row `last` over the same steps too. A quad's stored bytes u = w + 128 are
// widened a quarter at a time (rows 4r .. 4r + 3, their 4 inputs each), and fma(u, s, -128 s) is w * s
// rounded once, as the product of w would be: fewer vector instructions than taking w's bytes apart
// in place (tools/ab_forward.py, fast prefill, 1 thread, 5 rounds: SmolLM2 2,420-2,503 -> 2,538-2,591
// tok/s; the 1B shape, whose weights come from memory, 354-369 -> 352-371).
template <bool kLast>
void weights_bf16(const Q8Weights& w, int64_t b0, int64_t b1, int64_t s0, int64_t s1, __m512i* out,
                  const LastRow& last) {
  // Lane l of quarter r: row 4r + l / 4.
  __m512i quarter_rows[4];
  for (int r = 0; r < 4; ++r) {
    alignas(64) int32_t rows[16];
    for (int l = 0; l < 16; ++l) rows[l] = 4 * r + l / 4;
    quarter_rows[r] = _mm512_load_si512(rows);
  }
  // Two quarters packed hold their rows' input pairs as dwords 2 * row + pair (rows from the pack's
  // first); a tile row takes one pair of every row, dword n from the first pack (n < 8) or the second.
  alignas(64) int32_t first_pair[16], second_pair[16];
  for (int n = 0; n < 16; ++n) first_pair[n] = (n < 8 ? 0 : 16) + 2 * (n % 8), second_pair[n] = first_pair[n] + 1;
  const __m512i pair0 = _mm512_load_si512(first_pair), pair1 = _mm512_load_si512(second_pair);
  const __m512 minus_128 = _mm512_set1_ps(-128.f);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* blk = w.data + b * w.block_bytes;
    __m512i* state = kLast ? last.state + 3 * (b - b0) : nullptr;
    __m512 acc;
    __m512i hi, lo;
    if constexpr (kLast) acc = _mm512_castsi512_ps(state[0]), hi = state[1], lo = state[2];
    for (int64_t s = s0; s < s1; ++s, out += 16) {
      const int64_t k = s * kStep, g = k / w.group, first = (k - g * w.group) / 4;
      const int64_t quads = g + 1 == w.n_groups ? w.last_quads : w.group / 4;
      const uint8_t* rec = blk + g * w.group_bytes;
      const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(rec + quads * 64));
      __m512 scale[4], offset[4];
      for (int r = 0; r < 4; ++r) {
        scale[r] = _mm512_permutexvar_ps(quarter_rows[r], ws);
        offset[r] = _mm512_mul_ps(scale[r], minus_128);
      }
      if constexpr (kLast) {
        if (first == 0) hi = _mm512_setzero_si512(), lo = _mm512_set1_epi32(-last.sums[g]);
      }
      // This step's quads of the group: 8, or fewer in a last group (the tile rows past them zero).
      const int64_t n = std::min<int64_t>(8, quads - first);
      const uint8_t* quad = rec + first * 64;
      const int8_t* last_hi = kLast ? last.hi + g * w.group + 4 * first : nullptr;
#pragma GCC unroll 8
      for (int64_t j = 0; j < n; ++j) {
        const __m512i stored = _mm512_loadu_si512(quad + j * 64);
        _mm_prefetch(reinterpret_cast<const char*>(quad + j * 64 + kConvertAhead), _MM_HINT_T0);
        if constexpr (kLast) {
          int32_t h4, l4;
          std::memcpy(&h4, last_hi + 4 * j, 4);
          std::memcpy(&l4, last_hi + last.stride + 4 * j, 4);
          hi = _mm512_dpbusd_epi32(hi, stored, _mm512_set1_epi32(h4));
          lo = _mm512_dpbusd_epi32(lo, stored, _mm512_set1_epi32(l4));
        }
        const auto quarter = [&](int r) {
          const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quad + j * 64 + 16 * r)));
          return _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), scale[r], offset[r]);
        };
        const __m512i rows_0_7 = bf16_pack(quarter(0), quarter(1)), rows_8_15 = bf16_pack(quarter(2), quarter(3));
        out[2 * j] = _mm512_permutex2var_epi32(rows_0_7, pair0, rows_8_15);
        out[2 * j + 1] = _mm512_permutex2var_epi32(rows_0_7, pair1, rows_8_15);
      }
      for (int64_t j = n; j < 8; ++j) out[2 * j] = out[2 * j + 1] = _mm512_setzero_si512();
      if constexpr (kLast) {
        if (first + 8 >= quads) acc = add_two_digit_group(hi, lo, ws, last.scales[g], acc);
      }
    }
    if constexpr (kLast) state[0] = _mm512_castps_si512(acc), state[1] = hi, state[2] = lo;
  }
}

// Where a tile of sums goes: 16 rows of 16 floats, `stride` bytes apart.
struct SumsOut {
  float* at;
  int64_t stride;
};

// kTokens token tiles (a: their first row, rows pitch lines apart) x kBlocks blocks (b: the first's
// B tiles of steps [s0, s1), each block's s1 - s0 KiB) over steps [s0, s1); the sums of token tile i
// and block j start from in[i][j] (from zero without `in`) and are stored to out[i][j].
template <int kTokens, int kBlocks>
void bf16_tiles(const __m512i* a, const __m512i* b, int64_t s0, int64_t s1, int64_t pitch, const SumsOut (*in)[2],
                const SumsOut (*out)[2]) {
  const int64_t a_stride = pitch * 64, a1 = 16 * pitch, b1 = 16 * (s1 - s0);
  if (in) {
    _tile_loadd(kFC00, in[0][0].at, in[0][0].stride);
    if constexpr (kBlocks > 1) _tile_loadd(kFC01, in[0][1].at, in[0][1].stride);
    if constexpr (kTokens > 1) _tile_loadd(kFC10, in[1][0].at, in[1][0].stride);
    if constexpr (kTokens > 1 && kBlocks > 1) _tile_loadd(kFC11, in[1][1].at, in[1][1].stride);
  } else {
    _tile_zero(kFC00);
    if constexpr (kBlocks > 1) _tile_zero(kFC01);
    if constexpr (kTokens > 1) _tile_zero(kFC10);
    if constexpr (kTokens > 1 && kBlocks > 1) _tile_zero(kFC11);
  }
  // The weights' tiles are loaded as streams (tileloaddt1), which keeps them out of L1, where the
  // activations' rows, re-read by every block, then stay: with both from L2 the loop waits on it
  // (probe_matmul_q8 of fast rows, SmolLM2's shapes, 128 and 512 tokens: 17.2-20.7 -> 14.3-19.2 ns per
  // 16 x 16 x 32; the int8 tiles' weights as streams: no change).
  for (int64_t s = s0; s < s1; ++s) {
    _tile_loadd(kFA0, a + s, a_stride);
    if constexpr (kTokens > 1) _tile_loadd(kFA1, a + a1 + s, a_stride);
    _tile_stream_loadd(kFB0, b + 16 * (s - s0), 64);
    if constexpr (kBlocks > 1) _tile_stream_loadd(kFB1, b + b1 + 16 * (s - s0), 64);
    _tile_dpbf16ps(kFC00, kFA0, kFB0);
    if constexpr (kBlocks > 1) _tile_dpbf16ps(kFC01, kFA0, kFB1);
    if constexpr (kTokens > 1) _tile_dpbf16ps(kFC10, kFA1, kFB0);
    if constexpr (kTokens > 1 && kBlocks > 1) _tile_dpbf16ps(kFC11, kFA1, kFB1);
  }
  _tile_stored(kFC00, out[0][0].at, out[0][0].stride);
  if constexpr (kBlocks > 1) _tile_stored(kFC01, out[0][1].at, out[0][1].stride);
  if constexpr (kTokens > 1) _tile_stored(kFC10, out[1][0].at, out[1][0].stride);
  if constexpr (kTokens > 1 && kBlocks > 1) _tile_stored(kFC11, out[1][1].at, out[1][1].stride);
}

// Bytes of bf16 weights a thread converts at a time, which every pair of token tiles then re-reads
// from L2.
constexpr int64_t kBf16ChunkBytes = int64_t(1) << 19;
// Rows of more than kOnePassSteps steps (of 32 inputs; 2,048 inputs) are cut into passes of at most
// kPassSteps, each over a chunk of the weights converted for its steps alone, so that a chunk holds
// many blocks, over which the activations are read once (at 8,192 inputs a whole-row chunk held 2),
// and a pair of token tiles' activations over a pass, 36 KiB, stays in L1 (48 KiB here) while the
// weights stream past. Their sums wait between passes in a scratch tile per token tile and block.
// probe_matmul_q8 of fast rows, 128 tokens: 8,192 x 2,048 26.6-27.3 -> 22.4-22.8 ns per 16 x 16 x 32;
// passes at 2,048 inputs too: 19.1-21.1 -> 20.7-23.1 (the sums' reload and store).
constexpr int64_t kOnePassSteps = 64, kPassSteps = 18;

// Fast rows (all of x's) x blocks [b0, b1) of w on bf16 tiles. A row's results depend on it alone:
// the last tile's missing rows are zero rows, and every row is summed over the same steps. The rows of
// `rest` (two-digit rows; none if its T is 0): one (a prompt's last row) is summed in the weights'
// conversion (LastRow), which reads each stored quad for both; more go to two_digit_rows a chunk at a
// time, while the chunk's weights are in L2. tools/ab_forward.py, fast prefill, 1 thread, 4 rounds, a
// last row per chunk -> in the conversion: the 1B shape 280-301 -> 308-327 tok/s, SmolLM2 1,971-2,055
// -> 2,072-2,145 (as a pass of its own over all the weights it had been slower again: SmolLM2
// 1,805-1,852 against 1,870-1,956 per chunk).
void fast_rows(const Q8Acts& x, const Q8Acts& rest, const Q8Weights& w, int64_t b0, int64_t b1, float* y,
               float* y_rest, int64_t ldy) {
  const int64_t steps = (w.cols + kStep - 1) / kStep;
  const int64_t padded = (x.T + kTileTokens - 1) / kTileTokens * kTileTokens;
  const int64_t passes = steps > kOnePassSteps ? (steps + kPassSteps - 1) / kPassSteps : 1;
  const int64_t pass_steps = (steps + passes - 1) / passes;
  const int64_t chunk = std::max<int64_t>(1, kBf16ChunkBytes / (pass_steps * 1024));
  // Grown once per thread to the largest size met, then reused: no allocation per call.
  thread_local std::vector<__m512i> acts, weights;
  const int64_t pitch = acts_pitch(steps);
  if (acts.size() < size_t(padded * pitch)) acts.resize(size_t(padded * pitch));
  const size_t weight_vectors = size_t(std::min(chunk, b1 - b0) * pass_steps * 16);
  if (weights.size() < weight_vectors) weights.resize(weight_vectors);
  acts_bf16(x, steps, padded, acts.data());
  static const TileConfig config = bf16_config();
  _tile_loadconfig(&config);
  alignas(64) float c[2][2][16][16];
  thread_local std::vector<__m512i> partial;  // [token tile][block of the chunk] 16 x 16 sums
  const size_t partial_vectors = passes > 1 ? size_t(padded / kTileTokens * std::min(chunk, b1 - b0) * 16) : 0;
  if (partial.size() < partial_vectors) partial.resize(partial_vectors);
  // A prompt's one last row is summed in the conversion; more rows go to two_digit_rows.
  const bool fused = rest.T == 1;
  thread_local std::vector<__m512i> last_state;
  LastRow last;
  if (fused) {
    if (last_state.size() < size_t(3 * std::min(chunk, b1 - b0))) last_state.resize(size_t(3 * std::min(chunk, b1 - b0)));
    last = LastRow{rest.q, rest.stride, rest.scales, rest.sums, last_state.data()};
  }
  for (int64_t cb = b0; cb < b1; cb += chunk) {
    const int64_t ce = std::min(b1, cb + chunk);
    for (int64_t s0 = 0; s0 < steps; s0 += pass_steps) {
      const int64_t s1 = std::min(steps, s0 + pass_steps);
      if (fused) {
        if (s0 == 0)
          for (int64_t b = 0; b < ce - cb; ++b) last.state[3 * b] = _mm512_setzero_si512();
        weights_bf16<true>(w, cb, ce, s0, s1, weights.data(), last);
        if (s1 == steps)
          for (int64_t b = cb; b < ce; ++b) {
            const int64_t rows = std::min<int64_t>(kQ8Rows, w.rows - b * kQ8Rows);
            _mm512_mask_storeu_ps(y_rest + b * kQ8Rows, static_cast<__mmask16>((uint32_t(1) << rows) - 1),
                                  _mm512_castsi512_ps(last.state[3 * (b - cb)]));
          }
      } else {
        weights_bf16<false>(w, cb, ce, s0, s1, weights.data(), last);
      }
      // The tile loads' asm does not name the memory it reads: the conversions must be in memory first.
      __asm__ volatile("" ::: "memory");
      for (int64_t t = 0; t < padded; t += 2 * kTileTokens) {
        const int64_t token_tiles = std::min<int64_t>(2, (padded - t) / kTileTokens);
        const __m512i* a = acts.data() + t * pitch;
        for (int64_t b = cb; b < ce; b += 2) {
          const int64_t blocks = std::min<int64_t>(2, ce - b);
          const __m512i* bt = weights.data() + (b - cb) * (s1 - s0) * 16;
          // Between passes the sums wait in `partial`. After the last, whole tiles go straight to y; a
          // tile with rows or outputs past the ends goes to c, and its part inside them on to y
          // (reading sums back right after their store waits on it).
          SumsOut in[2][2], out[2][2];
          for (int64_t i = 0; i < token_tiles; ++i)
            for (int64_t j = 0; j < blocks; ++j) {
              // (Only with passes: without them `partial` may hold nothing, and no offset is formed.)
              const SumsOut kept =
                  passes > 1 ? SumsOut{reinterpret_cast<float*>(partial.data() +
                                                                ((t / kTileTokens + i) * (ce - cb) + (b - cb + j)) * 16),
                                       64}
                             : SumsOut{c[i][j][0], 64};
              const bool whole = t + (i + 1) * kTileTokens <= x.T && (b + j + 1) * kQ8Rows <= w.rows;
              in[i][j] = kept;
              out[i][j] = s1 < steps ? kept
                          : whole    ? SumsOut{y + (t + i * kTileTokens) * ldy + (b + j) * kQ8Rows, ldy * 4}
                                     : SumsOut{c[i][j][0], 64};
            }
          const SumsOut(*from)[2] = s0 > 0 ? in : nullptr;
          if (token_tiles == 2 && blocks == 2) bf16_tiles<2, 2>(a, bt, s0, s1, pitch, from, out);
          else if (token_tiles == 2) bf16_tiles<2, 1>(a, bt, s0, s1, pitch, from, out);
          else if (blocks == 2) bf16_tiles<1, 2>(a, bt, s0, s1, pitch, from, out);
          else bf16_tiles<1, 1>(a, bt, s0, s1, pitch, from, out);
          if (s1 < steps) continue;
          for (int64_t i = 0; i < token_tiles; ++i)
            for (int64_t j = 0; j < blocks; ++j) {
              if (out[i][j].at != c[i][j][0]) continue;
              const int64_t cols = std::min<int64_t>(kQ8Rows, w.rows - (b + j) * kQ8Rows);
              const __mmask16 mask = static_cast<__mmask16>((uint32_t(1) << cols) - 1);
              const int64_t rows = std::min<int64_t>(kTileTokens, x.T - (t + i * kTileTokens));
              float* to = y + (t + i * kTileTokens) * ldy + (b + j) * kQ8Rows;
              for (int64_t r = 0; r < rows; ++r) _mm512_mask_storeu_ps(to + r * ldy, mask, _mm512_load_ps(c[i][j][r]));
            }
        }
      }
    }
    if (rest.T > 0 && !fused) {
      two_digit_rows(rest, w, cb, ce, y_rest, ldy);
      _tile_loadconfig(&config);
    }
  }
  _tile_release();
}

void matmul_q8(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy) {
  const int64_t fast = std::min(x.one_digit_rows, x.T);
  const Q8Acts rest = q8_acts_rows(x, fast, x.T, w.n_groups);
  if (fast == 0 || b0 >= b1)
    two_digit_rows(rest, w, b0, b1, y + fast * ldy, ldy);
  else
    fast_rows(q8_acts_rows(x, 0, fast, w.n_groups), rest, w, b0, b1, y, y + fast * ldy, ldy);
}

#undef kFA0
#undef kFA1
#undef kFB0
#undef kFB1
#undef kFC00
#undef kFC01
#undef kFC10
#undef kFC11
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
    k.quantize_fast_bf16 = &quantize_bf16_row;
    // Decode over f32 / bf16 weights reads ahead too (kernels_impl.h, one_token_rows).
    k.matmul_f32 = &matmul_f32_avx512_ahead;
    k.matmul_bf16 = &matmul_bf16_avx512_ahead;
    return k;
  }();
  return table;
}

}  // namespace cpullm
