// int8 dot products on 256-bit registers with VNNI's vpdpbusd: the AVX-VNNI (VEX) encoding of CPUs that
// have it without AVX-512 (Intel Alder Lake and later client cores), or, compiled with
// CPULLM_VNNI256_EVEX from kernels_vnni256.cpp, the AVX512-VNNI + VL (EVEX) encoding of the same
// instruction, which AVX-512 machines run: so the code the avxvnni path ships is also what the tests
// run there. Everything else in these tables is the AVX2 path's.
//
// vpdpbusd multiplies unsigned by signed bytes: it takes the stored weights (w + 128) as they are and
// the signed activation digits, and the 128 * sum(x) this adds is taken back by seeding the lo digits'
// sums with -Q8Acts::sums, as the 512-bit path does. One instruction per 4 x 8 multiply-adds where AVX2
// needs four (two sign fix-ups, maddubs, madd) and an add.
#include <immintrin.h>

#include "kernels/kernels_impl.h"
#include "kernels/q8_x86.h"

namespace cpullm {
namespace {

struct Q8Vnni256 : Q8Avx2 {
  static inline I weights(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I seed(int32_t sum) { return _mm256_set1_epi32(-sum); }
  static inline I dot(I acc, I x, I w) {
#if defined(CPULLM_VNNI256_EVEX)
    return _mm256_dpbusd_epi32(acc, w, x);
#else
    return _mm256_dpbusd_avx_epi32(acc, w, x);
#endif
  }
};

}  // namespace

#if defined(CPULLM_VNNI256_EVEX)
const Kernels& kernels_vnni256() {
  static const Kernels table = [] {
    Kernels k = kernels_avx2();
    k.name = "vnni256";
#else
const Kernels& kernels_avxvnni() {
  static const Kernels table = [] {
    Kernels k = kernels_avx2();
    k.name = "avxvnni";
#endif
    set_matmul_q8(k, &Q8Impl<Q8Vnni256>::matmul_q8);
    k.q8_peak_loop = &Q8Impl<Q8Vnni256>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
