// Element types the fused LayerNorm kernels understand, shared by the CPU and CUDA interfaces.
// Plain C++ (no torch, no CUDA headers) so nvcc and the host compiler both read it.
#pragma once

namespace ln {

enum class DType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Statistics (mean, rstd) and accumulation are float64 for float64 inputs, float32 otherwise.
inline bool stats_are_double(DType x) { return x == DType::kFloat64; }

}  // namespace ln
