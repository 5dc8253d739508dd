// The CPU LayerNorm and RMSNorm kernels compiled for AVX2 + FMA + F16C. Only this file is built for that
// instruction set (by a target pragma, not a global -mavx2), and layer_norm_cpu.cpp calls into it
// only on a CPU that has it, so the extension still loads and runs on older x86 CPUs.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "layer_norm_cpu_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define LN_ISA avx2
#define LN_HAVE_F16C
#include "layer_norm_cpu_rows.inc"
#pragma GCC pop_options

#else
namespace ln {
namespace avx2 {
KernelSet kernel_set(DType, DType) { return {}; }  // never chosen off x86-64
KernelSet rms_kernel_set(DType, DType) { return {}; }
}  // namespace avx2
}  // namespace ln
#endif
