// Choosing the next token from one row of logits, in transformers' order of logits processors:
// repetition penalty, temperature, top-k, top-p, min-p (python/cpullm/sampling.py states the rules).
// It runs once per generated token, right after the forward pass, so it is written to touch the
// vocabulary as few times as it can: one strided sample and one pass to find a top-k pool, and
// exponentials only over the tokens that can still be drawn.
#pragma once
#include <cstdint>
#include <vector>

namespace cpullm {

struct SamplingSpec {
  float temperature = 0.f;  // 0: greedy (arg-max of the penalised logits)
  int64_t top_k = 0;        // 0: off
  double top_p = 1.0;       // 1: off
  double min_p = 0.0;       // 0: off
  float repetition_penalty = 1.f;
};

// The tokens sampling may choose and their probabilities (summing to 1), in no particular order.
// seen: the distinct token ids of the context, for the repetition penalty (each in [0, vocab)).
// Throws std::invalid_argument on bad settings, ids out of range, or logits with no finite value.
void filter_logits(const float* logits, int64_t vocab, const SamplingSpec& spec, const int64_t* seen,
                   int64_t n_seen, std::vector<int64_t>& ids, std::vector<double>& probs);

// One token: the arg-max when greedy, else the token whose cumulative probability (in filter_logits'
// order) first exceeds u, uniform in [0, 1).
int64_t sample_token(const float* logits, int64_t vocab, const SamplingSpec& spec, const int64_t* seen,
                     int64_t n_seen, double u);

}  // namespace cpullm
