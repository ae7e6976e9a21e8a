// The per-ISA kernel table. Each kernels_<isa>.cpp is compiled with its own instruction-set flags and
// fills one table; cpu/dispatch.cpp picks the best table the running CPU supports. Kernels are
// single-threaded over the range they are given: threading is decided by the caller (csrc/model).
#pragma once
#include <cstdint>

namespace cpullm {

// Storage type of a weight matrix. bf16 is kept as raw uint16 bits (the upper half of an f32).
enum class WType : int { F32 = 0, BF16 = 1 };

struct Kernels {
  const char* name;
  // y[t * ldy + n] = sum_k x[t * K + k] * w[n * K + k]   for t in [0, T), n in [n0, n1).
  // x: [T, K] row-major, w: [N, K] row-major (one output feature per row).
  void (*matmul_f32)(const float* x, int64_t T, int64_t K, const float* w, int64_t n0, int64_t n1,
                     float* y, int64_t ldy);
  void (*matmul_bf16)(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);
  // sum_i a[i] * b[i]
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  // y[i] += alpha * x[i]
  void (*axpy_f32)(float alpha, const float* x, float* y, int64_t n);
};

const Kernels& kernels_scalar();
#if defined(CPULLM_HAVE_X86_KERNELS)
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
#endif

}  // namespace cpullm
