#include "model/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

namespace cpullm {

namespace {

// Tokens this many nats below the best one have a probability under 1e-20 of the best one's: all of them
// together weigh less than the resolution of the uniform draw, and less than top-p (p < 1) or min-p
// (above 1e-20) would ever keep, so they are set aside before any exponential is taken.
constexpr double kNegligibleNats = 46.0;
// Every kSampleStride-th logit forms the sample that places a threshold just below the k-th largest.
constexpr int64_t kSampleStride = 64;
constexpr int64_t kSampleMargin = 8;

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// exp(d) for d in [-700, 0], to about 1 ulp of double: d = n ln2 + r with |r| <= ln2 / 2 (ln2 split in
// two so n ln2 is exact), a degree-12 Taylor polynomial for exp(r) (its remainder is below 2e-16), then
// 2^n built in the exponent bits. Branch-free and libm-free, so the compiler vectorises loops of it;
// libm's exp was most of the time of sampling over a whole vocabulary.
inline double exp_nonpositive(double d) {
  constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const double t = d * kLog2e + kRound;
  const double n = t - kRound;
  int64_t t_bits, round_bits;
  std::memcpy(&t_bits, &t, sizeof t);
  std::memcpy(&round_bits, &kRound, sizeof kRound);
  const int64_t ni = t_bits - round_bits;
  const double r = (d - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const uint64_t scale_bits = static_cast<uint64_t>(ni + 1023) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// max of v[0, n) with independent partial maxima, so the loop is not one long dependency chain. NaN
// never wins (every comparison with it is false); -inf when nothing else is there.
float max_of(const float* v, int64_t n) {
  float m[8];
  for (int j = 0; j < 8; ++j) m[j] = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = v[i + j] > m[j] ? v[i + j] : m[j];
  for (; i < n; ++i) m[0] = v[i] > m[0] ? v[i] : m[0];
  float best = m[0];
  for (int j = 1; j < 8; ++j) best = m[j] > best ? m[j] : best;
  return best;
}

struct Scratch {
  std::vector<float> penalised, sample, z, tmp;
  std::vector<int64_t> pool;
  std::vector<int64_t> order;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

void check(int64_t vocab, const SamplingSpec& spec) {
  if (vocab < 1) fail("sampling: empty logits");
  if (!std::isfinite(spec.temperature) || spec.temperature < 0.f) fail("sampling: temperature must be finite and >= 0");
  if (spec.top_k < 0) fail("sampling: top_k must be >= 0");
  if (!(spec.top_p > 0.0 && spec.top_p <= 1.0)) fail("sampling: top_p must be in (0, 1]");
  if (!(spec.min_p >= 0.0 && spec.min_p <= 1.0)) fail("sampling: min_p must be in [0, 1]");
  if (!std::isfinite(spec.repetition_penalty) || !(spec.repetition_penalty > 0.f))
    fail("sampling: repetition_penalty must be finite and > 0");
}

// The logits after the repetition penalty (a positive logit divided by it, a negative one multiplied),
// in float32 as transformers computes it; the caller's array when there is nothing to penalise.
const float* penalise(const float* logits, int64_t vocab, const SamplingSpec& spec, const int64_t* seen,
                      int64_t n_seen, Scratch& s) {
  if (spec.repetition_penalty == 1.f || n_seen == 0) return logits;
  s.penalised.assign(logits, logits + vocab);
  const float r = spec.repetition_penalty;
  for (int64_t i = 0; i < n_seen; ++i) {
    const int64_t id = seen[i];
    if (id < 0 || id >= vocab)
      fail("sampling: context token id " + std::to_string(id) + " is outside the vocabulary [0, " +
           std::to_string(vocab) + ")");
    const float v = logits[id];  // from the original, so a repeated id is penalised once
    s.penalised[id] = v < 0.f ? v * r : v / r;
  }
  return s.penalised.data();
}

// The first index of the largest value (as numpy.argmax, except that NaN is passed over): the maximum
// first, in a loop that vectorises, then where it is.
int64_t arg_max(const float* x, int64_t n) {
  const float best = max_of(x, n);
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == best) return i;
  return 0;  // nothing but NaN
}

// The value that `rank` values of v[0, n) are at least as large as (rank >= 1); reorders v, and counts
// NaN as -inf (nth_element needs a strict weak order, which NaN breaks).
float kth_largest(float* v, int64_t n, int64_t rank) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(v[i])) v[i] = -std::numeric_limits<float>::infinity();
  std::nth_element(v, v + (n - rank), v + n);
  return v[n - rank];
}

// Ids of a set that holds every token whose scaled logit is at least the k-th largest, found from a
// strided sample; false when the sample put its threshold too high, or the float32 rounding of the
// scaling could tie a token below the threshold with the k-th value. Scaling by a positive temperature
// is monotonic, so the pool is taken on the raw logits.
bool top_k_pool(const float* x, int64_t vocab, int64_t k, float temperature, Scratch& s) {
  s.sample.clear();
  for (int64_t i = 0; i < vocab; i += kSampleStride) s.sample.push_back(x[i]);
  const int64_t n = static_cast<int64_t>(s.sample.size());
  const float threshold = kth_largest(s.sample.data(), n, std::min(n, k / kSampleStride + kSampleMargin));
  s.pool.resize(static_cast<size_t>(vocab));
  int64_t m = 0;
  // Almost every token falls below the threshold: a span is only scanned when a vectorised test finds
  // one of its tokens at or above it.
  constexpr int64_t kSpan = 64;
  for (int64_t i0 = 0; i0 < vocab; i0 += kSpan) {
    const int64_t i1 = std::min(vocab, i0 + kSpan);
    int any = 0;
    for (int64_t i = i0; i < i1; ++i) any |= x[i] >= threshold;
    if (!any) continue;
    for (int64_t i = i0; i < i1; ++i) {
      s.pool[m] = i;
      m += x[i] >= threshold;
    }
  }
  s.pool.resize(static_cast<size_t>(m));
  if (m < k) return false;
  s.tmp.resize(static_cast<size_t>(m));
  for (int64_t j = 0; j < m; ++j) s.tmp[j] = x[s.pool[j]];
  const float kth = kth_largest(s.tmp.data(), m, k) / temperature;
  return threshold / temperature < kth;
}

// Keeps the most probable tokens whose mass reaches top_p (a token stays while the mass ranked above it
// is below top_p; at least one). Among equal probabilities the higher id ranks first, as in transformers'
// ascending sort that drops from the low end. Sorts only as many as it needs, growing the window.
void apply_top_p(std::vector<int64_t>& ids, std::vector<double>& probs, double top_p, Scratch& s) {
  const int64_t n = static_cast<int64_t>(ids.size());
  // The tokens at or above a threshold hold the whole nucleus as soon as their mass reaches top_p (every
  // token ranked above a member is in the set), so only they need sorting: the threshold starts at a
  // thousandth of the best probability and is lowered until the set's mass suffices.
  const double best = *std::max_element(probs.begin(), probs.end());
  s.order.resize(static_cast<size_t>(n));
  int64_t m = 0;
  for (double threshold = best * 1e-3;; threshold *= 1e-3) {
    double mass = 0.0;
    m = 0;
    for (int64_t i = 0; i < n; ++i) {
      s.order[m] = i;
      const bool in = probs[i] >= threshold;
      mass += in ? probs[i] : 0.0;
      m += in;
    }
    if (mass >= top_p || m == n || threshold == 0.0) break;
  }
  // Then the most probable w of them in order, w growing until their mass reaches top_p.
  const auto before = [&](int64_t a, int64_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && ids[a] > ids[b]); };
  const auto first = s.order.begin();
  int64_t keep = 0;
  for (int64_t w = std::min<int64_t>(m, 64);; w = std::min(m, 8 * w)) {
    if (w < m) std::nth_element(first, first + w, first + m, before);
    std::sort(first, first + w, before);
    double mass = 0.0;
    keep = 0;
    while (keep < w && mass < top_p) mass += probs[s.order[keep++]];
    if (keep < w || mass >= top_p || w == m) break;
  }
  keep = std::max<int64_t>(keep, 1);
  std::vector<int64_t> kept_ids(static_cast<size_t>(keep));
  std::vector<double> kept_probs(static_cast<size_t>(keep));
  for (int64_t j = 0; j < keep; ++j) {
    kept_ids[j] = ids[s.order[j]];
    kept_probs[j] = probs[s.order[j]];
  }
  ids.swap(kept_ids);
  probs.swap(kept_probs);
}

// Scales probs to sum to one. Four partial sums: one running sum is a chain of dependent additions.
void normalise(std::vector<double>& probs) {
  const size_t n = probs.size();
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) part[j] += probs[i + j];
  for (; i < n; ++i) part[0] += probs[i];
  const double inv = 1.0 / ((part[0] + part[1]) + (part[2] + part[3]));
  for (double& p : probs) p *= inv;
}

}  // namespace

void filter_logits(const float* logits, int64_t vocab, const SamplingSpec& spec, const int64_t* seen,
                   int64_t n_seen, std::vector<int64_t>& ids, std::vector<double>& probs) {
  check(vocab, spec);
  Scratch& s = scratch();
  const float* x = penalise(logits, vocab, spec, seen, n_seen, s);
  ids.clear();
  probs.clear();
  if (spec.temperature == 0.f) {
    ids.push_back(arg_max(x, vocab));
    probs.push_back(1.0);
    return;
  }
  const float temperature = spec.temperature;
  const bool top_k = spec.top_k > 0 && spec.top_k < vocab;
  const bool pooled = top_k && top_k_pool(x, vocab, spec.top_k, temperature, s);
  const int64_t m = pooled ? static_cast<int64_t>(s.pool.size()) : vocab;
  // The candidates' logits scaled in float32, as transformers scales them (so top-k sees the same ties).
  s.z.resize(static_cast<size_t>(m));
  float* z = s.z.data();
  if (pooled)
    for (int64_t j = 0; j < m; ++j) z[j] = x[s.pool[j]] / temperature;
  else
    for (int64_t j = 0; j < m; ++j) z[j] = x[j] / temperature;
  const float best = max_of(z, m);
  if (!std::isfinite(best)) {
    const int64_t top = arg_max(x, vocab);
    if (!std::isfinite(x[top])) fail("sampling: the logits hold no finite value to sample from");
    // A temperature so small that the scaled logits overflow float32: what is left is the limit of
    // temperature -> 0, the best token.
    ids.push_back(top);
    probs.push_back(1.0);
    return;
  }
  double floor = double(best) - kNegligibleNats;
  if (top_k) {
    s.tmp.assign(s.z.begin(), s.z.end());
    floor = std::max(floor, double(kth_largest(s.tmp.data(), m, spec.top_k)));
  }
  // Min-p's own cut (applied exactly below), lowered a little; not with top-p, which comes first and must
  // see every token min-p will drop.
  if (spec.min_p > 0.0 && spec.top_p == 1.0) floor = std::max(floor, double(best) + std::log(spec.min_p) - 1e-3);
  // Probabilities in float64: top-p compares running sums with p, where one float32 rounding decides
  // whether a token whose probability is exactly at the boundary stays.
  const float cut = static_cast<float>(floor);
  ids.resize(static_cast<size_t>(m));
  int64_t n = 0;
  for (int64_t j = 0; j < m; ++j) {  // branch-free compaction
    ids[n] = pooled ? s.pool[j] : j;
    s.z[n] = z[j];
    n += z[j] >= cut;
  }
  ids.resize(static_cast<size_t>(n));
  probs.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) probs[j] = exp_nonpositive(double(z[j]) - double(best));
  normalise(probs);
  if (spec.top_p < 1.0) {
    apply_top_p(ids, probs, spec.top_p, s);
    normalise(probs);
  }
  if (spec.min_p > 0.0) {
    const double limit = spec.min_p * *std::max_element(probs.begin(), probs.end());
    int64_t w = 0;
    for (size_t j = 0; j < probs.size(); ++j)
      if (probs[j] >= limit) {
        ids[w] = ids[j];
        probs[w++] = probs[j];
      }
    ids.resize(static_cast<size_t>(w));
    probs.resize(static_cast<size_t>(w));
    normalise(probs);
  }
}

int64_t sample_token(const float* logits, int64_t vocab, const SamplingSpec& spec, const int64_t* seen,
                     int64_t n_seen, double u) {
  if (!(u >= 0.0 && u < 1.0)) fail("sampling: the uniform draw must be in [0, 1)");
  thread_local std::vector<int64_t> ids;
  thread_local std::vector<double> probs;
  filter_logits(logits, vocab, spec, seen, n_seen, ids, probs);
  // probs sum to one up to rounding; should the running sum end just short of u, the last token is it.
  double cdf = 0.0;
  for (size_t j = 0; j < probs.size(); ++j) {
    cdf += probs[j];
    if (cdf > u) return ids[j];
  }
  return ids.back();
}

}  // namespace cpullm
