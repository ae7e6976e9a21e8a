// AArch64 with the int8 matrix-multiply extension (FEAT_I8MM: Apple M2 and later, Graviton 3 and later,
// Neoverse V1 / N2, Cortex-A710 / X2 and later). Compiled with +i8mm; only called after dispatch has
// checked the CPU. Of the extension only usdot is used: unsigned by signed bytes, so, like x86's
// vpdpbusd, it takes the stored weights (w + 128) as they are, and the 128 * sum(x) that adds is taken
// back by seeding the lo digits' sums with -Q8Acts::sums. That saves neondot's flip of every weight
// vector: 4 of a two-digit prefill tile's 24 vector instructions per quad, 4 of a decoded token's 14.
#include <arm_neon.h>

#include "kernels/kernels_impl.h"
#include "kernels/q8_neon.h"

namespace cpullm {
namespace {

struct Q8NeonI8mm : Q8Neon {
  static inline I weights(const uint8_t* p) {
    return {vreinterpretq_s32_u8(vld1q_u8(p)), vreinterpretq_s32_u8(vld1q_u8(p + 16))};
  }
  static inline I seed(int32_t sum) { return {vdupq_n_s32(-sum), vdupq_n_s32(-sum)}; }
  static inline I dot(I acc, I x, I w) {
    return {vusdotq_s32(acc.a, vreinterpretq_u8_s32(w.a), vreinterpretq_s8_s32(x.a)),
            vusdotq_s32(acc.b, vreinterpretq_u8_s32(w.b), vreinterpretq_s8_s32(x.b))};
  }
};

}  // namespace

const Kernels& kernels_neoni8mm() {
  static const Kernels table = [] {
    Kernels k = kernels_neon();
    k.name = "neoni8mm";
    set_matmul_q8(k, &Q8Impl<Q8NeonI8mm>::matmul_q8);
    k.q8_peak_loop = &Q8Impl<Q8NeonI8mm>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
