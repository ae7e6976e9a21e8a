// AArch64 with the dot-product extension (Armv8.2+ DotProd: Apple M1 and later, Graviton 2 and later,
// Ampere Altra, Cortex-A76 / A55 and later). Compiled with +dotprod; only called after dispatch has
// checked the CPU. sdot multiplies signed by signed bytes and adds each group of four into its int32
// lane, which is Q8Impl's dot exactly: one instruction per 4 x 4 multiply-adds where the baseline path
// needs two widening multiplies and two pairwise adds per 16. Everything else is the baseline NEON path's.
#include <arm_neon.h>

#include "kernels/kernels_impl.h"
#include "kernels/q8_neon.h"

namespace cpullm {
namespace {

struct Q8NeonDot : Q8Neon {
  static inline I dot(I acc, I x, I w) {
    return {vdotq_s32(acc.a, vreinterpretq_s8_s32(x.a), vreinterpretq_s8_s32(w.a)),
            vdotq_s32(acc.b, vreinterpretq_s8_s32(x.b), vreinterpretq_s8_s32(w.b))};
  }
};

}  // namespace

const Kernels& kernels_neondot() {
  static const Kernels table = [] {
    Kernels k = kernels_neon();
    k.name = "neondot";
    set_matmul_q8(k, &Q8Impl<Q8NeonDot>::matmul_q8);
    k.q8_peak_loop = &Q8Impl<Q8NeonDot>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
