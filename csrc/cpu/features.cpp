#include "cpu/features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <cstdint>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace cpullm {

namespace {

#if defined(__x86_64__) || defined(_M_X64)
// The CPU may advertise AVX/AVX-512 while the OS does not save their registers on a context switch:
// XCR0 says which register states the OS manages.
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux hands a process the AMX tile data state (8 KiB per thread) only on request; until then a tile
// instruction faults. Other systems are not known to cpullm to work the same way, so they go without.
bool os_grants_amx_tiles() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // asm/prctl.h, asm/fpu/xstate.h
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  const bool avx = (ecx >> 28) & 1;
  const bool fma = (ecx >> 12) & 1;
  const bool f16c = (ecx >> 29) & 1;
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm) return f;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.fma = fma;
  f.f16c = f16c;
  f.avx2 = ((ebx >> 5) & 1) && fma;
  const unsigned max_subleaf = eax;
  if (os_zmm) {
    f.avx512f = (ebx >> 16) & 1;
    f.avx512dq = (ebx >> 17) & 1;
    f.avx512bw = (ebx >> 30) & 1;
    f.avx512vl = (ebx >> 31) & 1;
    f.avx512vnni = (ecx >> 11) & 1;
  }
  const bool os_tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG + XTILEDATA
  if (os_zmm && os_tiles && ((edx >> 24) & 1) && ((edx >> 25) & 1)) {
    f.amx_int8 = os_grants_amx_tiles();
    f.amx_bf16 = f.amx_int8 && ((edx >> 22) & 1);
  }
  if (max_subleaf >= 1) {
    __cpuid_count(7, 1, eax, ebx, ecx, edx);
    f.avxvnni = (eax >> 4) & 1;
    f.avx512bf16 = os_zmm && ((eax >> 5) & 1);
  }
  return f;
}
#else
CpuFeatures detect() {
  CpuFeatures f;
#if defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
#if defined(__linux__)
  // HWCAP_ASIMDDP: the kernel reports what user space may execute.
  f.neon_dotprod = (getauxval(AT_HWCAP) >> 20) & 1;
  f.neon_i8mm = (getauxval(AT_HWCAP2) >> 13) & 1;  // HWCAP2_I8MM
#elif defined(__APPLE__)
  int has = 0;
  size_t size = sizeof has;
  // macOS 11 has no FEAT_* names; every Apple silicon CPU (M1 and later) has DotProd.
  f.neon_dotprod = sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &size, nullptr, 0) != 0 || has;
  has = 0;
  size = sizeof has;
  f.neon_i8mm = sysctlbyname("hw.optional.arm.FEAT_I8MM", &has, &size, nullptr, 0) == 0 && has;
#endif
#endif
  return f;
}
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace cpullm
