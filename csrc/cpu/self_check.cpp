#include "cpu/self_check.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace cpullm {

namespace {

// Sizes that reach every branch of the tiled kernels: one-digit rows in tiles of 4 and a single one,
// two-digit rows in tiles of 2 and a single one; on AMX (whose fast rows are a case of their own, on
// bf16 tiles: a whole tile and one of 5 rows, then a tile of two-digit rows and 5 left to the VNNI
// tiles) two tiles of 16 two-digit rows and 10 rows left to the VNNI tiles; five row blocks of 16 (two
// pairs and one alone; for one token, four streams and one alone) with the last one partial; a last
// group of 4 inputs after three whole ones. Then one token alone (decode), and a prompt's last row
// after fast rows (on AMX summed in the fast rows' weight conversion).
constexpr int64_t kTokens = 42, kOneDigitRows = 21, kInputs = 100, kOutputs = 69, kGroup = 32;

// A fixed pseudo-random sequence (the check must not depend on a seed the caller could vary).
struct Lcg {
  uint64_t state = 0x9E3779B97F4A7C15ull;
  uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);
  }
  float uniform() { return static_cast<float>(next()) / 2147483648.0f * 2.0f - 1.0f; }  // [-1, 1)
};

// max |y - ref| / max |ref| over elements [from, end): a broken kernel is off by O(1), a sound one by
// float rounding only.
double relative_error(const std::vector<float>& y, const std::vector<float>& ref, size_t from = 0) {
  double worst = 0, scale = 0;
  for (size_t i = from; i < ref.size(); ++i) {
    scale = std::fmax(scale, std::fabs(double(ref[i])));
    const double d = std::fabs(double(y[i]) - double(ref[i]));
    worst = std::isnan(d) ? INFINITY : std::fmax(worst, d);
  }
  return scale > 0 ? worst / scale : worst;
}

// The first `tokens` rows of x, rows [0, fast_rows) of them fast prefill's.
std::vector<float> run_q8(const Kernels& k, const std::vector<float>& x, const std::vector<int8_t>& wq,
                          const std::vector<float>& ws, int64_t fast_rows, int64_t tokens = kTokens) {
  Q8Weights w = q8_layout(kOutputs, kInputs, kGroup);
  std::vector<uint8_t> packed(size_t(w.block_bytes * w.n_blocks));
  pack_q8(wq.data(), ws.data(), w, packed.data());
  w.data = packed.data();
  const int64_t G = w.n_groups, stride = q8_act_stride(kInputs);
  std::vector<int8_t> xq(size_t(2 * tokens * stride));
  std::vector<float> xs(size_t(tokens * G));
  std::vector<int32_t> sums(size_t(tokens * G)), shifts(size_t(tokens * G));
  std::vector<float> units(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t)
    quantize_q8_for_matmul(k, x.data() + t * kInputs, kInputs, kGroup, stride, xq.data() + 2 * t * stride,
                           xs.data() + t * G, sums.data() + t * G, t < fast_rows, shifts.data() + t * G,
                           units.data() + t);
  Q8Acts acts = q8_acts(xq.data(), xs.data(), sums.data(), tokens, kInputs, shifts.data(), units.data());
  acts.one_digit_rows = fast_rows;
  std::vector<float> y(size_t(tokens * kOutputs));
  k.matmul_q8(acts, w, 0, w.n_blocks, y.data(), kOutputs);
  return y;
}

std::vector<float> run_f32(const Kernels& k, const std::vector<float>& x, const std::vector<float>& w) {
  std::vector<float> y(size_t(kTokens * kOutputs));
  k.matmul_f32(x.data(), kTokens, kInputs, w.data(), 0, kOutputs, y.data(), kOutputs);
  return y;
}

std::vector<float> run_bf16(const Kernels& k, const std::vector<float>& x, const std::vector<uint16_t>& w) {
  std::vector<float> y(size_t(kTokens * kOutputs));
  k.matmul_bf16(x.data(), kTokens, kInputs, w.data(), 0, kOutputs, y.data(), kOutputs);
  return y;
}

}  // namespace

std::string self_check(const Kernels& k) {
  const Kernels& ref = kernels_scalar();
  if (&k == &ref) return "";
  Lcg rng;
  std::vector<float> x(size_t(kTokens * kInputs)), wf(size_t(kOutputs * kInputs));
  for (float& v : x) v = rng.uniform();
  for (float& v : wf) v = rng.uniform();
  std::vector<int8_t> wq(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) wq[i] = static_cast<int8_t>(std::lround(wf[i] * 127.0f));
  std::vector<float> ws(size_t(kOutputs * ((kInputs + kGroup - 1) / kGroup)));
  for (float& v : ws) v = (1.5f + rng.uniform()) / 127.0f;
  std::vector<uint16_t> wb(wf.size());  // bf16 by truncation: exact inputs for both paths all the same
  for (size_t i = 0; i < wf.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &wf[i], sizeof bits);
    wb[i] = static_cast<uint16_t>(bits >> 16);
  }

  // The int8 paths sum integers exactly and scale them in the same order as the scalar path; the float
  // ones differ from it by the order of 100 rounded additions (~1e-6 relative). 1e-4 leaves a wide
  // margin for both and still catches any kernel that reads the wrong layout or skips work (errors of
  // order 1, as the int8 paths of one table-copying mistake showed).
  constexpr double kTolerance = 1e-4;
  // Fast rows on bf16 tiles (Kernels::quantize_fast_bf16) round every activation and scaled weight to bf16
  // (2^-9 relative each): against the two-digit rows, ~1e-3 of the largest output here.
  constexpr double kBf16Tolerance = 1e-2;
  struct Case {
    const char* what;
    double error, tolerance;
  };
  const int64_t exact_fast_rows = k.quantize_fast_bf16 ? 0 : kOneDigitRows;
  const Case cases[] = {
      {"int8 matmul", relative_error(run_q8(k, x, wq, ws, exact_fast_rows), run_q8(ref, x, wq, ws, exact_fast_rows)),
       kTolerance},
      {"int8 matmul of fast rows on bf16 tiles",
       k.quantize_fast_bf16 ? relative_error(run_q8(k, x, wq, ws, kOneDigitRows), run_q8(ref, x, wq, ws, 0)) : 0.0,
       kBf16Tolerance},
      {"int8 matmul of one token", relative_error(run_q8(k, x, wq, ws, 0, 1), run_q8(ref, x, wq, ws, 0, 1)), kTolerance},
      {"int8 matmul of a prompt's last row after fast rows",
       relative_error(run_q8(k, x, wq, ws, kTokens - 1), run_q8(ref, x, wq, ws, 0), size_t((kTokens - 1) * kOutputs)),
       kTolerance},
      {"f32 matmul", relative_error(run_f32(k, x, wf), run_f32(ref, x, wf)), kTolerance},
      {"bf16 matmul", relative_error(run_bf16(k, x, wb), run_bf16(ref, x, wb)), kTolerance},
  };
  std::string failures;
  for (const Case& c : cases) {
    if (c.error <= c.tolerance) continue;
    char line[160];
    std::snprintf(line, sizeof line, "%s%s differs from the scalar path (relative error %.3g)",
                  failures.empty() ? "" : "; ", c.what, c.error);
    failures += line;
  }
  return failures;
}

}  // namespace cpullm
