// kernels_avxvnni.cpp's int8 matmul in the EVEX encoding (AVX512-VNNI + VL), see there.
#define CPULLM_VNNI256_EVEX 1
#include "kernels/kernels_avxvnni.cpp"
