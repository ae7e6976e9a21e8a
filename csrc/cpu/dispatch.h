// Run-time choice of the kernel table: at start-up the best path the CPU supports whose self-check passes.
// The environment variable CPULLM_ISA (see available_isas) forces a path at start-up; set_isa() changes it
// later (tests use it to check every path).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace cpullm {

// The table in use now.
const Kernels& kernels();
// Names of the paths this CPU can run, best last.
std::vector<std::string> available_isas();
// A path passed over at start-up because its self-check (cpu/self_check.h) failed, and why.
struct SelfCheckFailure {
  std::string isa, why;
};
// The best available path that `check` passes (empty string: passed), scalar being taken unchecked;
// the ones passed over are appended to `failures`. Start-up takes the path this picks with self_check
// unless CPULLM_ISA forces one.
std::string pick_isa(const std::function<std::string(const Kernels&)>& check, std::vector<SelfCheckFailure>& failures);
// The paths start-up passed over (normally none); Python warns of each at import.
const std::vector<SelfCheckFailure>& self_check_failures();
// Switches to the named path; throws std::invalid_argument if unknown or unsupported here.
void set_isa(const std::string& name);

}  // namespace cpullm
