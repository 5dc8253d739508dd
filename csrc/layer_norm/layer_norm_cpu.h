// CPU fused LayerNorm and RMSNorm over the last dimension of a row-major [rows, cols] array: a
// plain C++ interface (raw pointers, sizes, element types) so the kernels know nothing of torch.
//
// Supported (x, weight) types: (f32, f32), (f64, f64), (bf16, bf16), (bf16, f32), (f16, f16),
// (f16, f32). y/dx have x's type, dgamma/dbeta the weight's, mean/rstd are float32 (float64 for
// float64 x). Gamma and beta must be given (callers without an affine pass ones and zeros).
#pragma once

#include <cstdint>

#include "layer_norm_types.h"

namespace ln {

// y = (x - mean) * rstd * gamma + beta, row by row; also writes mean[rows] and rstd[rows].
void cpu_forward(DType x_type, DType w_type, const void* x, const void* gamma, const void* beta,
                 void* y, void* mean, void* rstd, int64_t rows, int64_t cols, double eps);

// dx (always) and, when dgamma/dbeta are non-null, the weight gradients summed over rows.
void cpu_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* mean,
                  const void* rstd, const void* gamma, void* dx, void* dgamma, void* dbeta,
                  int64_t rows, int64_t cols);

// RMSNorm: y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps), row by row; also writes
// rstd[rows]. Same type rules as the LayerNorm; gamma must be given.
void cpu_rms_forward(DType x_type, DType w_type, const void* x, const void* gamma, void* y,
                     void* rstd, int64_t rows, int64_t cols, double eps);

// dx (always) and, when dgamma is non-null, dgamma summed over rows.
void cpu_rms_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* rstd,
                      const void* gamma, void* dx, void* dgamma, int64_t rows, int64_t cols);

// The instruction set the kernels (both norms) run with: "avx2" (AVX2+FMA+F16C, chosen at run time where the
// CPU has it) or "generic" (baseline x86-64 / the target's default). set_cpu_isa() forces one, so
// tests and benchmarks can exercise both; it returns false for an ISA this CPU cannot run.
const char* cpu_isa();
bool set_cpu_isa(const char* name);

}  // namespace ln
