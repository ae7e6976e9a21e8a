// The int8 formats shared by every ISA: the packed weight layout (see Q8Weights in kernels.h) and the
// two-digit activation quantizer. Compiled with the baseline flags: this runs once per matmul (the
// quantizer) or once per load (packing), and the loops are written so the compiler vectorises them.
#include <cmath>
#include <limits>
#include <cstring>

#include "kernels/kernels.h"

namespace cpullm {

namespace {

// Round half to even for |v| < 2^22, as nearbyint does in the default rounding mode, without a libm
// call: adding 1.5 * 2^23 leaves no fraction bits, so the addition itself rounds. Written this way the
// loops below vectorise on the baseline ISA.
inline float round_even(float v) {
  const float magic = 12582912.f;
  return (v + magic) - magic;
}

// NaN clamps to -127, as the vector paths' max(v, -127) then min(., 127) do: every path gives the same
// digits for a NaN activation, and no NaN reaches the conversion to int8 (undefined behaviour).
inline float clamp127(float v) { return !(v > -127.f) ? -127.f : (v > 127.f ? 127.f : v); }

inline int64_t group_len(const Q8Weights& w, int64_t g) {
  const int64_t rest = w.cols - g * w.group;
  return rest < w.group ? rest : w.group;
}

}  // namespace

int64_t q8_act_stride(int64_t K) { return (K + 3) / 4 * 4; }

Q8Acts q8_acts(const int8_t* q, const float* scales, const int32_t* sums, int64_t T, int64_t K,
              const int32_t* shifts, const float* units) {
  Q8Acts a;
  a.q = q;
  a.scales = scales;
  a.sums = sums;
  a.shifts = shifts;
  a.units = units;
  a.T = T;
  a.stride = q8_act_stride(K);
  return a;
}

Q8Weights q8_layout(int64_t rows, int64_t cols, int64_t group) {
  Q8Weights w;
  w.rows = rows;
  w.cols = cols;
  w.group = group;
  w.n_groups = (cols + group - 1) / group;
  w.n_blocks = (rows + kQ8Rows - 1) / kQ8Rows;
  w.group_bytes = 16 * group + 64;
  w.last_quads = (group_len(w, w.n_groups - 1) + 3) / 4;
  w.block_bytes = (w.n_groups - 1) * w.group_bytes + 64 * w.last_quads + 64;
  return w;
}

void pack_q8(const int8_t* q, const float* scales, const Q8Weights& layout, uint8_t* out) {
  const int64_t K = layout.cols, G = layout.n_groups;
  // Blocks are independent; loading a large model is mostly this loop and its page faults.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < layout.n_blocks; ++b) {
    uint8_t* block = out + b * layout.block_bytes;
    for (int64_t g = 0; g < G; ++g) {
      uint8_t* rec = block + g * layout.group_bytes;
      const int64_t begin = g * layout.group, len = group_len(layout, g), quads = (len + 3) / 4;
      float rec_scales[kQ8Rows];
      for (int r = 0; r < kQ8Rows; ++r) {
        const int64_t row = b * kQ8Rows + r;
        int64_t k = 0;
        if (row < layout.rows) {
          const int8_t* src = q + row * K + begin;
          for (; k < len; ++k) rec[(k / 4) * 64 + 4 * r + k % 4] = static_cast<uint8_t>(src[k]) ^ 0x80;
        }
        for (; k < 4 * quads; ++k) rec[(k / 4) * 64 + 4 * r + k % 4] = 0x80;  // w = 0
        rec_scales[r] = row < layout.rows ? scales[row * G + g] : 0.f;
      }
      std::memcpy(rec + quads * 64, rec_scales, sizeof rec_scales);
    }
  }
}

void q8_row(const Q8Weights& w, int64_t row, float* out) {
  const uint8_t* block = w.data + (row / kQ8Rows) * w.block_bytes;
  const int64_t r = row % kQ8Rows;
  for (int64_t g = 0; g < w.n_groups; ++g) {
    const uint8_t* rec = block + g * w.group_bytes;
    const int64_t begin = g * w.group, len = group_len(w, g), quads = (len + 3) / 4;
    float scale;
    std::memcpy(&scale, rec + quads * 64 + 4 * r, sizeof scale);
    for (int64_t k = 0; k < len; ++k)
      out[begin + k] = static_cast<float>(static_cast<int>(rec[(k / 4) * 64 + 4 * r + k % 4]) - 128) * scale;
  }
}

float q8_row_absmax(const float* x, int64_t K) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    amax = a > amax ? a : amax;
  }
  return amax;
}

float q8_fast_shifts(const float* scales, int64_t G, int64_t group, int32_t* shifts) {
  const int max_shift = q8_fast_max_shift(group);
  float largest = 0.f;
  for (int64_t g = 0; g < G; ++g) largest = scales[g] > largest ? scales[g] : largest;
  uint32_t bits;
  std::memcpy(&bits, &largest, 4);
  const int top = int(bits >> 23);
  for (int64_t g = 0; g < G; ++g) {
    int d = 0;
    if (scales[g] >= std::numeric_limits<float>::min()) {
      std::memcpy(&bits, scales + g, 4);
      d = max_shift - (top - int(bits >> 23));
      d = d < 0 ? 0 : d > max_shift ? max_shift : d;
    }
    shifts[g] = d;
  }
  return std::ldexp(127.f * largest, -max_shift);
}

void quantize_row_q8(const float* x, int64_t K, int64_t group, int64_t stride, int8_t* q, float* scales,
                     int32_t* sums, bool one_digit) {
  int8_t* hi = q;
  int8_t* lo = q + stride;
  for (int64_t k = K; k < stride; ++k) hi[k] = lo[k] = 0;
  if (one_digit) std::memset(lo, 0, size_t(K));
  const int max_shift = q8_fast_max_shift(group);
  const float row_scale = one_digit ? q8_row_absmax(x, K) / 127.f : 0.f;
  for (int64_t begin = 0, g = 0; begin < K; begin += group, ++g) {
    const int64_t end = begin + group < K ? begin + group : K;
    float amax = 0.f;
    for (int64_t k = begin; k < end; ++k) {
      const float a = std::fabs(x[k]);
      amax = a > amax ? a : amax;
    }
    const float scale = one_digit ? q8_fast_scale(row_scale, amax / 127.f, max_shift) : amax / 127.f;
    const float fine = scale / 127.f;
    scales[g] = fine;
    // All zero, or so small that the fine step is not a normal float (max |x| below ~1.9e-34, where
    // 1 / fine could overflow and 0 * inf make NaN digits): both digits 0.
    if (!(fine >= std::numeric_limits<float>::min())) {
      for (int64_t k = begin; k < end; ++k) hi[k] = lo[k] = 0;
      sums[g] = 0;
      continue;
    }
    // Multiplying by reciprocals (two float32 divisions per group, not two per value) keeps the vector
    // forms cheap; the digits stay within half a step plus an ulp.
    const float inv = 1.f / scale, inv_fine = 1.f / fine;
    int32_t sum_hi = 0, sum_lo = 0;
    for (int64_t k = begin; k < end; ++k) {
      const float h = round_even(clamp127(x[k] * inv));
      hi[k] = static_cast<int8_t>(h);
      sum_hi += static_cast<int32_t>(h);
      if (one_digit) continue;
      const float l = round_even(clamp127((x[k] - h * scale) * inv_fine));
      lo[k] = static_cast<int8_t>(l);
      sum_lo += static_cast<int32_t>(l);
    }
    sums[g] = 128 * (127 * sum_hi + sum_lo);
  }
}

}  // namespace cpullm
