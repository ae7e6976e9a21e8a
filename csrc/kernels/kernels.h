// The per-ISA kernel table. Each kernels_<isa>.cpp is compiled with its own instruction-set flags and
// fills one table; cpu/dispatch.cpp picks the best table the running CPU supports. Kernels are
// single-threaded over the range they are given: threading is decided by the caller (csrc/model).
#pragma once
#include <cstdint>
#include <cstring>

namespace cpullm {

// Storage type of a weight matrix. bf16 is kept as raw uint16 bits (the upper half of an f32). Q8 is
// group-wise symmetric int8: w[n][k] ~= q[n][k] * scale[n][k / group], with one f32 scale per `group`
// consecutive inputs (the last group of a row may be shorter).
enum class WType : int { F32 = 0, BF16 = 1, Q8 = 2 };

// Bytes of int8 the integer dot-product kernels consume per step; groups are multiples of it.
constexpr int kQ8Block = 32;
// |sum over a group of 128 * 127 * 127| must stay below 2^31.
constexpr int kQ8MaxGroup = 512;
// Output rows per block of the packed int8 layout: one 64-byte vector holds 4 inputs of 16 rows.
constexpr int kQ8Rows = 16;
// The key cache holds each KV head's keys transposed in blocks of kKeyBlock positions: block b is
// [hd][kKeyBlock] floats, element (d, j) the d-th component of position b * kKeyBlock + j, and a head's
// blocks follow each other. So q . k for a block's 16 positions is hd vector multiply-adds of a
// broadcast q[d] with one contiguous row, with no horizontal sums, and a head's keys are one stream.
constexpr int kKeyBlock = 16;
// Query rows Kernels::attend handles at once (more are taken in batches of this many): each key and
// value row loaded serves them all.
constexpr int kAttendHeads = 6;
// Attention over a long range of positions goes in chunks aligned to multiples of kAttendChunk
// positions, whose results are folded in order (attend_fold): by one thread walking a query's chunks
// (attend_chunked), or by several threads each taking chunks of one query (decode over a long cache,
// where a query's KV group alone would leave threads idle or make each read the cache again). Both fold
// the same way, so results do not depend on the thread count.
constexpr int kAttendChunk = 256;
// The largest head Kernels::attend_bf16 takes.
constexpr int64_t kBf16MaxHeadDim = 256;

// An element of a half-precision KV cache: the bits of an IEEE binary16 value. A type of its own, so
// that kernels over f32 and f16 caches are overloads (bf16 weights are plain uint16_t).
struct Half {
  uint16_t bits;
};

// IEEE binary16 -> f32, exact (subnormals, infinities and NaN included).
static inline float half_to_float(Half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: man * 2^-24, normalised
    int e = 113;
    uint32_t m = man;
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    bits = sign | (uint32_t(e) << 23) | ((m & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// f32 -> IEEE binary16, rounded to nearest even (as F16C's vcvtps2ph). Values beyond the f16 range,
// infinities included, saturate to +-65504 (an infinity in the cache would turn a softmax into NaN);
// NaN stays NaN. These helpers are static: this header is compiled under several ISA flags, and a
// shared out-of-line copy built with AVX-512 could be the one baseline code calls.
static inline Half float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};          // NaN
  if (a >= 0x477ff000u) return Half{uint16_t(sign | 0x7bffu)};         // rounds past 65504: saturate
  if (a >= 0x38800000u) {                                               // a normal f16
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;     // rebias the exponent, round
    return Half{uint16_t(sign | (r >> 13))};
  }
  if (a < 0x33000000u) return Half{sign};                               // below half the least subnormal
  // Subnormal: shift the significand (with its implicit bit) right, rounding to nearest even.
  const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;  // shift in [14, 24]
  const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  return Half{uint16_t(sign | (q + (rem > halfway || (rem == halfway && (q & 1u)))))};
}

// An element of fast prefill's bf16 copy of one layer's KV cache (Kernels::attend_bf16): the upper
// half of an f32, rounded to nearest even. The copy pairs its elements for a bf16 dot product, which
// sums two products per f32 lane:
//   keys: kKeyBlock-position blocks as in the cache, with each two consecutive components interleaved:
//     block b is [hd / 2][kKeyBlock][2], element (d, j) at ((d / 2) * kKeyBlock + j) * 2 + d % 2;
//   values: each two consecutive positions interleaved, [positions / 2][hd][2], element (p, d) at
//     ((p / 2) * hd + d) * 2 + p % 2, the pair past an odd count of positions padded with zeros.
struct Bf16 {
  uint16_t bits;
};

// Int8 weights in the layout the kernels read, made once at load time by pack_q8 from the row-major
// form (q [rows, cols] int8, scales [rows, n_groups]). Rows come in blocks of kQ8Rows; a block holds,
// for each group in turn, ceil(len / 4) 64-byte "quads" (byte 4 * r + j of quad i is row r's weight at
// input 4 * i + j of the group, stored as w + 128 so that VNNI can treat it as unsigned; padding is
// w = 0) and then the 16 rows' f32 scales of that group. A block is one contiguous stream, and a
// vector of 16 lanes accumulates 16 output rows, so a tile needs no horizontal sums and applies each
// group's scales once per 16 rows. The fields are plain data (no member functions), because this
// header is compiled under several ISA flags (see kernels_impl.h).
struct Q8Weights {
  const uint8_t* data = nullptr;
  int64_t rows = 0, cols = 0, group = 0;
  int64_t n_groups = 0;      // ceil(cols / group)
  int64_t n_blocks = 0;      // ceil(rows / kQ8Rows)
  int64_t group_bytes = 0;   // bytes of a full group's record: 16 * group + 64
  int64_t last_quads = 0;    // quads of the last group: ceil(its length / 4)
  int64_t block_bytes = 0;   // bytes of one block: (n_groups - 1) * group_bytes + 64 * last_quads + 64
};

// Activations of one int8 matmul, quantized by quantize_row_q8 with the weights' group size (so the
// weights' n_groups also indexes scales and sums).
struct Q8Acts {
  const int8_t* q = nullptr;       // [T, 2 * stride]: hi digits [0, K) then lo digits [stride, stride + K)
  const float* scales = nullptr;   // [T, n_groups]
  const int32_t* sums = nullptr;   // [T, n_groups]: 128 * (127 * sum(hi) + sum(lo)) over the group
  int64_t T = 0, stride = 0;
  // Rows [0, one_digit_rows) are fast prefill's rows. They carry one digit: their lo digits are zero
  // (quantize_row_q8's one_digit), so their sums are 128 * 127 * sum(hi), and the one-digit tiles skip
  // them (the same integer sums either way) and scale each group by its shift (below). On a path with
  // Kernels::quantize_fast_bf16 they hold bf16 values instead (and no scales or sums).
  int64_t one_digit_rows = 0;
  // For the one-digit rows (quantize_q8_for_matmul fills them; every int8 matmul's one-digit tiles read
  // them, so they must be set where one_digit_rows > 0 but on a path with quantize_fast_bf16): each
  // group's scale as a shift of its integer sum, shifts[t * n_groups + g] = d in [0, q8_fast_max_shift],
  // and the row's unit u = units[t], such that hi * (127 * scales[g]) = (hi << d) * u up to the float
  // rounding of 127 * scales[g] (see q8_fast_scale): a kernel may then scale a group's sum by a shift
  // and multiply the row's total once, instead of one float multiply per group and 16 rows.
  const int32_t* shifts = nullptr;   // [T, n_groups]
  const float* units = nullptr;      // [T]
};

// Rows [t0, t1) of x as a view of their own (n_groups: the weights' groups per row), its one-digit
// rows those of x that fall in the range.
inline Q8Acts q8_acts_rows(const Q8Acts& x, int64_t t0, int64_t t1, int64_t n_groups) {
  Q8Acts rows = x;
  rows.q += 2 * t0 * x.stride;
  rows.scales += t0 * n_groups;
  rows.sums += t0 * n_groups;
  if (rows.shifts != nullptr) rows.shifts += t0 * n_groups;
  if (rows.units != nullptr) rows.units += t0;
  rows.T = t1 - t0;
  const int64_t one_digit = x.one_digit_rows - t0;
  rows.one_digit_rows = one_digit < 0 ? 0 : one_digit < rows.T ? one_digit : rows.T;
  return rows;
}

// stride of Q8Acts for K inputs: K rounded up to whole quads (the padding digits are zero).
int64_t q8_act_stride(int64_t K);
// The Q8Acts view of T rows of K inputs quantized by quantize_row_q8.
Q8Acts q8_acts(const int8_t* q, const float* scales, const int32_t* sums, int64_t T, int64_t K,
              const int32_t* shifts = nullptr, const float* units = nullptr);
// The Q8Weights description of a [rows, cols] matrix with this group (data left null; its size is
// block_bytes * n_blocks).
Q8Weights q8_layout(int64_t rows, int64_t cols, int64_t group);
// Packs row-major int8 weights into `out` (layout.block_bytes * layout.n_blocks bytes).
void pack_q8(const int8_t* q, const float* scales, const Q8Weights& layout, uint8_t* out);
// Row `row` of packed weights, dequantized: out[k] = w[row][k] * scale.
void q8_row(const Q8Weights& w, int64_t row, float* out);

struct Kernels {
  const char* name;
  // y[t * ldy + n] = sum_k x[t * K + k] * w[n * K + k]   for t in [0, T), n in [n0, n1).
  // x: [T, K] row-major, w: [N, K] row-major (one output feature per row).
  void (*matmul_f32)(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1,
                     float* y, int64_t ldy);
  void (*matmul_bf16)(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);
  // Integer-dot matmul over packed weights, for the row blocks [b0, b1) (rows past w.rows are not
  // written). Activations carry two int8 digits per value, x ~= xs * (127 * hi + lo):
  // y[t * ldy + n] = sum_g xs[t][g] * ws[n][g] * sum_{k in g} (127 * hi[t][k] + lo[t][k]) * wq[n][k].
  // group % kQ8Block == 0 and group <= kQ8MaxGroup (the int32 sums cannot overflow).
  void (*matmul_q8)(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y, int64_t ldy);
  // quantize_row_q8 (below), vectorised for the ISA; results are bit-identical on every path.
  void (*quantize_q8)(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                      int32_t* sums, bool one_digit);
  // Where set, this ISA's matmul_q8 reads its two-digit rows (those at or past Q8Acts::one_digit_rows)
  // in a wide layout, which this writes: the row's 2 * stride bytes hold stride int16 values 127 * hi +
  // lo (|value| <= 16256; zero past K), with quantize_row_q8's scales and sums. On AVX2, which has no
  // int8 dot product into 32 bits, one 16-bit multiply-add of both digits at once replaces an int8 one
  // per digit (each a sign fix-up of both operands and two multiplies). Use quantize_q8_for_matmul;
  // set only through set_matmul_q8, with the matmul that reads it.
  void (*quantize_q8_wide)(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                           int32_t* sums) = nullptr;
  // Where set (AMX), matmul_q8 computes the fast rows, [0, Q8Acts::one_digit_rows), on bf16 tiles, and
  // this writes them (quantize_q8_for_matmul): a row's 2 * stride bytes hold stride bf16 values, x
  // rounded to nearest even, zero past K; its scales and sums are not written. Each weight times its
  // group's scale is rounded to bf16 too, and the products are summed in f32 over the whole row, with
  // no per-group step: more exact than one digit, and not the other paths' bits (tests bound its error).
  void (*quantize_fast_bf16)(const float* x, int64_t K, int64_t stride, int8_t* q) = nullptr;
  // Compute probe (tools/probe.py): `iterations` x 8 x 32 int8 multiply-adds from registers.
  int64_t (*q8_peak_loop)(int64_t iterations);
  // sum_i a[i] * b[i]
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  // y[i] += alpha * x[i]
  void (*axpy_f32)(float alpha, const float* x, float* y, int64_t n);
  // out[i] = gate[i] / (1 + exp(-gate[i])) * up[i]; out may equal gate.
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  // Attention of n_q query rows of one KV head over its cached positions: row r over [first, last + r /
  // per_token] (the heads of one token share a range; a tile of consecutive tokens' heads, per_token
  // rows each, sees one position more per token), out[r][hd] = sum_p softmax_p(scale * q[r] . k_p) * v_p.
  // q and out: n_q rows of hd floats. k: that KV head's keys in kKeyBlock-position blocks (see
  // kKeyBlock), from position 0; v: its values, [positions, hd] from position 0. scores: scratch of
  // min(n_q, kAttendHeads) * (last_r / kKeyBlock - first / kKeyBlock + 1) * kKeyBlock floats, last_r the
  // last row's end. stats, when not null: per row {max_p scale * q . k_p, sum_p exp(that - max)}, what
  // attend_fold needs to join the results of several position ranges. A row's result does not depend
  // on the rows it is computed with.
  void (*attend)(const float* q, int64_t n_q, const float* k, const float* v, int64_t first, int64_t last,
                 int64_t per_token, int64_t hd, float scale, float* scores, float* out, float* stats);
  // The same over an f16 cache (same layouts); every product and sum is still f32.
  void (*attend_f16)(const float* q, int64_t n_q, const Half* k, const Half* v, int64_t first, int64_t last,
                     int64_t per_token, int64_t hd, float scale, float* scores, float* out, float* stats);
  // out[i] = float_to_half(x[i]): what an f16 KV cache stores, the same bits on every path.
  void (*to_f16)(const float* x, Half* out, int64_t n);
  // Kernels::attend over bf16 copies of a KV head's keys and values (see Bf16 for their layouts), for
  // fast prefill's rows, whose activations are rounded to one int8 digit (~8 bits) already: q is
  // rounded to bf16, the softmax is f32 and its weights are rounded to bf16 for the values' sums, and
  // every pair of products is summed into f32 by the bf16 dot product, twice the multiply-adds per
  // instruction of f32. hd % 16 == 0, hd <= kBf16MaxHeadDim. scores: as Kernels::attend's. Null on paths without a bf16 dot
  // product (then pair_bf16 and pair_bf16_f16 are null too).
  void (*attend_bf16)(const float* q, int64_t n_q, const Bf16* k, const Bf16* v, int64_t first, int64_t last,
                      int64_t per_token, int64_t hd, float scale, float* scores, float* out, float* stats) = nullptr;
  // Consecutive rows interleaved in pairs, rounded to bf16: out[(r * n + i) * 2 + j] = x[(2 r + j) * ld + i]
  // for r < ceil(rows / 2), i < n, j < 2 (zeros past the last row), from an f32 or f16 cache. A KV head's
  // key blocks are rows of kKeyBlock (ld = n = kKeyBlock, rows = blocks * hd), its values rows of hd.
  void (*pair_bf16)(const float* x, int64_t ld, int64_t n, int64_t rows, Bf16* out) = nullptr;
  void (*pair_bf16_f16)(const Half* x, int64_t ld, int64_t n, int64_t rows, Bf16* out) = nullptr;
};

static inline auto attend_kernel(const Kernels& k, const float*) { return k.attend; }
static inline auto attend_kernel(const Kernels& k, const Half*) { return k.attend_f16; }
static inline auto attend_kernel(const Kernels& k, const Bf16*) { return k.attend_bf16; }
static inline auto pair_kernel(const Kernels& k, const float*) { return k.pair_bf16; }
static inline auto pair_kernel(const Kernels& k, const Half*) { return k.pair_bf16_f16; }

// Folds a chunk's attention output oc [hd] (its stats {max, sum} from Kernels::attend) into the
// output o [hd] of the positions before it, whose stats `running` is updated: o becomes the attention
// over both ranges.
void attend_fold(float* o, float* running, const float* oc, const float* chunk_stats, int64_t hd);

// Kernels::attend of n_q query rows (row r over [first, last + r / per_token]), kAttendChunk-aligned
// chunk by chunk, folded in order into out [n_q][hd]. Every row's range ends in the chunk `last` lies
// in. scores: as Kernels::attend needs for one chunk (kAttendHeads * (kAttendChunk + 2 * kKeyBlock)
// floats); part: n_q * (hd + 4) floats of scratch.
void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const float* kc, const float* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out);
void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const Half* kc, const Half* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out);
// The same with Kernels::attend_bf16 over bf16 copies (k.attend_bf16 must not be null).
void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const Bf16* kc, const Bf16* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out);

const Kernels& kernels_scalar();
#if defined(CPULLM_HAVE_X86_KERNELS)
const Kernels& kernels_avx2();
const Kernels& kernels_vnni256();  // the AVX2 path with 256-bit VNNI for int8 (EVEX: AVX512-VNNI + VL)
const Kernels& kernels_avx512();
const Kernels& kernels_avx512vnni();
#endif
#if defined(CPULLM_HAVE_AVX512BF16_KERNELS)
const Kernels& kernels_avx512bf16();  // the AVX512-VNNI path with bf16 attention for fast prefill
#endif
#if defined(CPULLM_HAVE_X86_KERNELS)
// avx512vnni's matmul_q8 with software prefetch in its one-token kernel and one token's blocks read as
// four streams (the same results), which the amx table leaves decode and a prompt's last tokens to
// (kernels_avx512vnni.cpp says why).
void matmul_q8_avx512vnni_prefetching(const Q8Acts& x, const Q8Weights& w, int64_t b0, int64_t b1, float* y,
                                      int64_t ldy);
// avx512's f32 / bf16 matmuls with decode reading 4 KiB ahead (KernelsImpl::one_token_rows; bf16 in
// four streams, one_token_streams), for the amx table; the same results.
void matmul_f32_avx512_ahead(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1, float* y,
                             int64_t ldy);
void matmul_bf16_avx512_ahead(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                              float* y, int64_t ldy);
#endif
#if defined(CPULLM_HAVE_AMX_KERNELS)
const Kernels& kernels_amx();  // the AVX512-BF16 path with prompts' matmuls on AMX tiles
#endif
#if defined(CPULLM_HAVE_NEON_KERNELS)
const Kernels& kernels_neon();     // AArch64 Advanced SIMD
#endif
#if defined(CPULLM_HAVE_NEONDOT_KERNELS)
const Kernels& kernels_neondot();  // the same with sdot for int8 (Armv8.2 DotProd)
#endif
#if defined(CPULLM_HAVE_NEONI8MM_KERNELS)
const Kernels& kernels_neoni8mm();  // the same with usdot (FEAT_I8MM): the stored weights as they are
#endif
#if defined(CPULLM_HAVE_AVXVNNI_KERNELS)
const Kernels& kernels_avxvnni();  // the same with AVX-VNNI (VEX), for CPUs without AVX-512
#endif

// The largest shift a one-digit row's group sum may take: the sum of `group` products of a digit
// (|hi| <= 127) and a weight (|w| <= 128), shifted left by it, stays within int32.
constexpr int q8_fast_max_shift(int64_t group) {
  int shift = 0;
  while (shift < 30 && group * 127 * 128 * (int64_t(2) << shift) <= int64_t(0x7fffffff)) ++shift;
  return shift;
}

// A one-digit row's scale for a group whose own scale (max|x| / 127) is group_scale, in a row whose
// largest group scale is row_scale: row_scale * 2^-k for the largest k in [0, max_shift] that keeps it at
// or above group_scale (so the group's digits stay within [-127, 127], at up to one bit less precision).
// Every group scale of the row is then the row's times a power of two, which a kernel applies to the
// group's integer sum as a shift (Q8Acts::shifts). In a row scale so small that 2^-max_shift of it
// would not be a normal float, k stops where it still is. A zero (or subnormal) group keeps its scale,
// as does every group of a row whose scale is not finite.
inline float q8_fast_scale(float row_scale, float group_scale, int max_shift) {
  uint32_t r, g;
  std::memcpy(&r, &row_scale, 4);
  std::memcpy(&g, &group_scale, 4);
  const int er = int(r >> 23), eg = int(g >> 23);  // both >= 0: the sign bits are clear
  if (eg == 0 || er >= 255) return group_scale;
  const int most = er <= 1 ? 0 : max_shift < er - 1 ? max_shift : er - 1;
  int k = er - eg - ((r & 0x7fffffu) < (g & 0x7fffffu) ? 1 : 0);
  k = k < 0 ? 0 : k > most ? most : k;
  const uint32_t out = r - (uint32_t(k) << 23);
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

// Q8Acts::shifts and units of a one-digit row from the G scales quantize_row_q8 stored for it (each
// its largest times a power of two, or zero): d = max_shift - k for a scale 2^-k times the largest, u =
// 127 * largest * 2^-max_shift. Groups whose scale is zero or not a normal float have zero digits and
// get d = 0.
float q8_fast_shifts(const float* scales, int64_t G, int64_t group, int32_t* shifts);
// max |x[k]| over the row, a NaN never the maximum (as quantize_row_q8's groups).
float q8_row_absmax(const float* x, int64_t K);

// Quantizes one row of activations per group into two int8 digits (see matmul_q8): scale s = max|x| / 127,
// hi = round_half_even(x * (1 / s)), lo = round_half_even((x - hi * s) * (1 / (s / 127))), in float32
// with float32 reciprocals; stores s / 127 as the
// group's scale. Two digits keep activations at about 14 bits, so int8 costs little more accuracy than
// the weights' own rounding, while every product is still an int8 dot product. q: [2 * stride] (see
// Q8Acts; padding digits are zeroed); sums: per group 128 * (127 * sum(hi) + sum(lo)), which a kernel
// reading the weights as unsigned (w + 128) subtracts. A group whose s / 127 is not a normal float (all
// zero, NaN, or max|x| below ~1.9e-34) gets zero digits. one_digit (fast prefill's rows): one digit per
// value, its lo digits all zero, so sums[g] = 128 * 127 * sum(hi); each group's scale s is
// q8_fast_scale(the row's largest max|x| / 127, the group's max|x| / 127, q8_fast_max_shift(group)),
// so that its digits are those of two digits with that scale.
void quantize_row_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                     int32_t* sums, bool one_digit);

// Sets a table's int8 matmul together with the wide layout it reads (none: quantize_q8's), so that a
// table derived from another's never pairs its own matmul with the other's activation layout.
inline void set_matmul_q8(Kernels& k, decltype(Kernels::matmul_q8) matmul,
                          decltype(Kernels::quantize_q8_wide) wide_quantizer = nullptr) {
  k.matmul_q8 = matmul;
  k.quantize_q8_wide = wide_quantizer;
}

// One row of a matmul_q8's activations as k's matmul_q8 reads it: fast rows (fast prefill's, which must
// be the first Q8Acts::one_digit_rows) by quantize_q8 with one digit, or as bf16 values where k
// computes them on bf16 tiles (Kernels::quantize_fast_bf16); the others in k's wide layout where it has
// one.
// A one-digit row also gets its Q8Acts::shifts (G of them) and unit where those are given.
inline void quantize_q8_for_matmul(const Kernels& k, const float* x, int64_t K, int64_t group, int64_t stride,
                                   int8_t* q, float* scales, int32_t* sums, bool fast_row,
                                   int32_t* shifts = nullptr, float* unit = nullptr) {
  if (fast_row && k.quantize_fast_bf16) {
    k.quantize_fast_bf16(x, K, stride, q);
  } else if (!fast_row && k.quantize_q8_wide) {
    k.quantize_q8_wide(x, K, group, stride, q, scales, sums);
  } else {
    k.quantize_q8(x, K, group, stride, q, scales, sums, fast_row);
    if (fast_row && shifts != nullptr && unit != nullptr)
      *unit = q8_fast_shifts(scales, (K + group - 1) / group, group, shifts);
  }
}

}  // namespace cpullm
