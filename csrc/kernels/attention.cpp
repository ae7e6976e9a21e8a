// Long attention ranges in chunks: see kAttendChunk in kernels.h. Compiled with the baseline flags: the
// fold runs once per chunk and head (hd values), next to a kernel that does kAttendChunk * hd work.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernels.h"

namespace cpullm {

void attend_fold(float* o, float* running, const float* oc, const float* chunk_stats, int64_t hd) {
  const float m = std::max(running[0], chunk_stats[0]);
  // Each range's weight: its sum of exponentials, brought to the common maximum.
  const float a = running[1] * std::exp(running[0] - m), b = chunk_stats[1] * std::exp(chunk_stats[0] - m);
  const float inv = 1.f / (a + b), wa = a * inv, wb = b * inv;
  for (int64_t i = 0; i < hd; ++i) o[i] = o[i] * wa + oc[i] * wb;
  running[0] = m;
  running[1] = a + b;
}

namespace {

template <class KT>
void chunked(const Kernels& k, const float* q, int64_t n_q, const KT* kc, const KT* vc, int64_t first, int64_t last,
             int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out) {
  const auto attend = attend_kernel(k, kc);
  float* running = part;             // [n_q][2]
  float* chunk_stats = part + 2 * n_q;  // [n_q][2]
  float* chunk_out = part + 4 * n_q;    // [n_q][hd]
  for (int64_t c = first / kAttendChunk; c <= last / kAttendChunk; ++c) {
    const int64_t a = std::max(first, c * kAttendChunk), b = std::min(last, c * kAttendChunk + kAttendChunk - 1);
    // Every row sees the whole of a chunk before the last one.
    const int64_t rows_per_end = b == last ? per_token : n_q;
    if (a == first) {
      attend(q, n_q, kc, vc, a, b, rows_per_end, hd, scale, scores, out, running);
      continue;
    }
    attend(q, n_q, kc, vc, a, b, rows_per_end, hd, scale, scores, chunk_out, chunk_stats);
    for (int64_t h = 0; h < n_q; ++h)
      attend_fold(out + h * hd, running + 2 * h, chunk_out + h * hd, chunk_stats + 2 * h, hd);
  }
}

}  // namespace

void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const float* kc, const float* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out) {
  chunked(k, q, n_q, kc, vc, first, last, per_token, hd, scale, scores, part, out);
}

void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const Half* kc, const Half* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out) {
  chunked(k, q, n_q, kc, vc, first, last, per_token, hd, scale, scores, part, out);
}

void attend_chunked(const Kernels& k, const float* q, int64_t n_q, const Bf16* kc, const Bf16* vc, int64_t first,
                    int64_t last, int64_t per_token, int64_t hd, float scale, float* scores, float* part, float* out) {
  chunked(k, q, n_q, kc, vc, first, last, per_token, hd, scale, scores, part, out);
}

}  // namespace cpullm
