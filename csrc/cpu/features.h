// CPU feature detection. Everything here is queried at run time: the build itself targets the
// baseline ISA, and wider kernels are only called when the running CPU (and OS) supports them.
#pragma once
#include <string>

namespace cpullm {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;  // AVX512_BF16: vdpbf16ps, bf16 conversions
  bool avxvnni = false;  // AVX-VNNI: vpdpbusd on ymm without AVX-512 (VEX encoding)
  bool amx_int8 = false;  // AMX-TILE + AMX-INT8, with the tile state granted to this process by the OS
  bool amx_bf16 = false;  // AMX-BF16 (tdpbf16ps) as well
  bool neon = false;
  bool neon_dotprod = false;  // Armv8.2 DotProd (sdot / udot)
  bool neon_i8mm = false;     // FEAT_I8MM (usdot, smmla)
};

// Detected once; cheap to call.
const CpuFeatures& cpu_features();

}  // namespace cpullm
