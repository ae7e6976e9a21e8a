// The per-ISA kernel table. Each kernels_<isa>.cpp is compiled with its own instruction-set flags and
// fills one table; cpu/dispatch.cpp picks the best table the running CPU supports. Kernels are
// single-threaded over the range they are given: threading is decided by the caller (csrc/model).
#pragma once
#include <cstdint>

namespace cpullm {

// Storage type of a weight matrix. bf16 is kept as raw uint16 bits (the upper half of an f32). Q8 is
// group-wise symmetric int8: w[n][k] ~= q[n][k] * scale[n][k / group], with one f32 scale per `group`
// consecutive inputs (the last group of a row may be shorter).
enum class WType : int { F32 = 0, BF16 = 1, Q8 = 2 };

// Bytes of int8 the integer dot-product kernels consume per step; groups are multiples of it.
constexpr int kQ8Block = 32;
// |sum over a group of 128 * 127 * 127| must stay below 2^31.
constexpr int kQ8MaxGroup = 512;

struct Kernels {
  const char* name;
  // y[t * ldy + n] = sum_k x[t * K + k] * w[n * K + k]   for t in [0, T), n in [n0, n1).
  // x: [T, K] row-major, w: [N, K] row-major (one output feature per row).
  void (*matmul_f32)(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1,
                     float* y, int64_t ldy);
  void (*matmul_bf16)(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);
  // Integer-dot matmul. Activations come quantized by quantize_row_q8 with the weights' group size as
  // two int8 digits per value: xq [T, 2K] (row t: hi digits [0, K), lo digits [K, 2K)) and one scale per
  // group xs [T, ceil(K / group)], with x ~= xs * (127 * hi + lo). Weights wq [N, K] int8, ws [N, G].
  // y[t * ldy + n] = sum_g xs[t][g] * ws[n][g] * sum_{k in g} (127 * hi[t][k] + lo[t][k]) * wq[n][k].
  // group % kQ8Block == 0 and group <= kQ8MaxGroup (the int32 sums cannot overflow).
  void (*matmul_q8)(const int8_t* xq, const float* xs, int64_t T, int64_t K, int64_t group, const int8_t* wq,
                    const float* ws, int64_t n0, int64_t n1, float* y, int64_t ldy);
  // Compute probe (tools/probe.py): `iterations` x 8 x 32 int8 multiply-adds from registers.
  int64_t (*q8_peak_loop)(int64_t iterations);
  // sum_i a[i] * b[i]
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  // y[i] += alpha * x[i]
  void (*axpy_f32)(float alpha, const float* x, float* y, int64_t n);
};

const Kernels& kernels_scalar();
#if defined(CPULLM_HAVE_X86_KERNELS)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_avx512vnni();
#endif

// Quantizes one row of activations per group into two int8 digits (see matmul_q8): scale s = max|x| / 127,
// hi = round_half_even(x / s), lo = round_half_even((x - hi * s) / (s / 127)); stores s / 127 as the
// group's scale. Two digits keep activations at about 14 bits, so int8 costs little more accuracy than
// the weights' own rounding, while every product is still an int8 dot product. q: [2K].
void quantize_row_q8(const float* x, int64_t K, int64_t group, int8_t* q, float* scales);

}  // namespace cpullm
