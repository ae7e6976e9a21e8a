#include "cpu/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "cpu/features.h"
#include "cpu/self_check.h"

namespace cpullm {

namespace {

const Kernels* table_for(const std::string& name) {
  const CpuFeatures& f = cpu_features();
  if (name == "scalar") return &kernels_scalar();
#if defined(CPULLM_HAVE_NEON_KERNELS)
  if (name == "neon" && f.neon) return &kernels_neon();
#if defined(CPULLM_HAVE_NEONDOT_KERNELS)
  if (name == "neondot" && f.neon && f.neon_dotprod) return &kernels_neondot();
#endif
#if defined(CPULLM_HAVE_NEONI8MM_KERNELS)
  // Built with +dotprod too, so the compiler may use sdot anywhere in it.
  if (name == "neoni8mm" && f.neon && f.neon_dotprod && f.neon_i8mm) return &kernels_neoni8mm();
#endif
#endif
#if defined(CPULLM_HAVE_X86_KERNELS)
  if (name == "avx2" && f.avx2 && f.fma && f.f16c) return &kernels_avx2();
#if defined(CPULLM_HAVE_AVXVNNI_KERNELS)
  if (name == "avxvnni" && f.avx2 && f.fma && f.f16c && f.avxvnni) return &kernels_avxvnni();
#endif
  if (name == "vnni256" && f.avx2 && f.fma && f.f16c && f.avx512vl && f.avx512vnni) return &kernels_vnni256();
  if (name == "avx512" && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma)
    return &kernels_avx512();
  if (name == "avx512vnni" && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.avx512vnni)
    return &kernels_avx512vnni();
#if defined(CPULLM_HAVE_AVX512BF16_KERNELS)
  if (name == "avx512bf16" && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.avx512vnni &&
      f.avx512bf16)
    return &kernels_avx512bf16();
#endif
#if defined(CPULLM_HAVE_AMX_KERNELS)
  if (name == "amx" && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.avx512vnni && f.avx512bf16 &&
      f.amx_int8 && f.amx_bf16)
    return &kernels_amx();
#endif
#endif
  (void)f;
  return nullptr;
}

std::vector<SelfCheckFailure>& start_failures() {
  static std::vector<SelfCheckFailure> failures;
  return failures;
}

const Kernels* initial_table() {
  if (const char* forced = std::getenv("CPULLM_ISA")) {
    // Taken as asked, unchecked: forcing a path is how one reproduces what it does.
    if (const Kernels* k = table_for(forced)) return k;
    // An unusable forced value must not crash module import: fall back and let cpu_features() tell.
  }
  return table_for(pick_isa(self_check, start_failures()));
}

std::atomic<const Kernels*>& current() {
  static std::atomic<const Kernels*> table{initial_table()};
  return table;
}

}  // namespace

const Kernels& kernels() { return *current().load(std::memory_order_acquire); }

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  // In order of preference: the last one available is the default.
  for (const char* name : {"scalar", "neon", "neondot", "neoni8mm", "avx2", "avxvnni", "vnni256", "avx512", "avx512vnni",
                           "avx512bf16", "amx"})
    if (table_for(name)) names.emplace_back(name);
  return names;
}

std::string pick_isa(const std::function<std::string(const Kernels&)>& check, std::vector<SelfCheckFailure>& failures) {
  const std::vector<std::string> names = available_isas();
  for (auto name = names.rbegin(); name != names.rend(); ++name) {
    if (*name == "scalar") return *name;  // the reference the others are checked against
    std::string why = check(*table_for(*name));
    if (why.empty()) return *name;
    failures.push_back({*name, std::move(why)});
  }
  return "scalar";
}

const std::vector<SelfCheckFailure>& self_check_failures() {
  current();  // the choice is made, and the failures recorded, with the first table
  return start_failures();
}

void set_isa(const std::string& name) {
  const Kernels* k = table_for(name);
  if (!k) {
    std::string known;
    for (const auto& n : available_isas()) known += (known.empty() ? "" : ", ") + n;
    throw std::invalid_argument("kernel path '" + name + "' is unknown or not supported by this CPU (available: " +
                                known + ")");
  }
  current().store(k, std::memory_order_release);
}

}  // namespace cpullm
