// AVX-512 with VNNI (Cascade Lake, Ice Lake, Zen 4 and later): the AVX-512 table with the int8 matmul
// built on vpdpbusd. Compiled with -mavx512vnni; only called after dispatch has checked the CPU.
#include "kernels/q8_x86.h"

namespace cpullm {

const Kernels& kernels_avx512vnni() {
  static const Kernels table = [] {
    Kernels k = kernels_avx512();
    k.name = "avx512vnni";
    k.matmul_q8 = &Q8Impl<Q8Vnni>::matmul_q8;
    k.q8_peak_loop = &Q8Impl<Q8Vnni>::peak_loop;
    return k;
  }();
  return table;
}

}  // namespace cpullm
