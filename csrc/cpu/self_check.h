// A kernel table's start-up self-check: its matmuls (int8 with its own activation quantizer, f32, bf16)
// on a small fixed problem against the scalar path's. A CPU family the project cannot test on (an ISA
// whose table is derived from another's, an Arm core only emulated so far) could otherwise get a path
// that runs and returns wrong numbers; dispatch picks the best path that passes instead (dispatch.cpp).
#pragma once
#include <string>

#include "kernels/kernels.h"

namespace cpullm {

// Empty if k agrees with the scalar path; else what differs and by how much. Takes microseconds.
std::string self_check(const Kernels& k);

}  // namespace cpullm
