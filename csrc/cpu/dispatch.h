// Run-time choice of the kernel table. The environment variable CPULLM_ISA (scalar, avx2, avx512, avx512vnni)
// forces a path at start-up; set_isa() changes it later (tests use it to check every path).
#pragma once
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace cpullm {

// The table in use now.
const Kernels& kernels();
// Names of the paths this CPU can run, best last.
std::vector<std::string> available_isas();
// Switches to the named path; throws std::invalid_argument if unknown or unsupported here.
void set_isa(const std::string& name);

}  // namespace cpullm
