// CUDA fused LayerNorm and RMSNorm over the last dimension of a row-major [rows, cols] array: a plain C++
// interface (device pointers, sizes, element types, a stream) so layer_norm_cuda.cu compiles with
// nvcc alone, without torch's headers. Same type rules as layer_norm_cpu.h: (x, weight) is
// (f32, f32), (f64, f64), (bf16, bf16), (bf16, f32), (f16, f16) or (f16, f32); y/dx have x's
// type, dgamma/dbeta the weight's, mean/rstd float32 (float64 for float64 x). Every pointer is a
// device pointer on the current device; gamma and beta must be given.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "layer_norm_types.h"

namespace ln {

cudaError_t cuda_forward(DType x_type, DType w_type, const void* x, const void* gamma,
                         const void* beta, void* y, void* mean, void* rstd, int64_t rows,
                         int64_t cols, double eps, cudaStream_t stream);

// Bytes of scratch cuda_backward needs for the first stage of the dgamma/dbeta reduction (one
// partial sum per block), for the current device.
size_t cuda_backward_workspace_bytes(DType x_type, DType w_type, int64_t rows, int64_t cols);

// dx always; dgamma and dbeta when both are non-null (then `workspace` must hold
// cuda_backward_workspace_bytes()).
cudaError_t cuda_backward(DType x_type, DType w_type, const void* dy, const void* x,
                          const void* mean, const void* rstd, const void* gamma, void* dx,
                          void* dgamma, void* dbeta, void* workspace, int64_t rows, int64_t cols,
                          cudaStream_t stream);

// RMSNorm: y = x * rstd * gamma, rstd = 1 / sqrt(mean(x^2) + eps); also writes rstd[rows].
cudaError_t cuda_rms_forward(DType x_type, DType w_type, const void* x, const void* gamma, void* y,
                             void* rstd, int64_t rows, int64_t cols, double eps, cudaStream_t stream);

size_t cuda_rms_backward_workspace_bytes(DType x_type, DType w_type, int64_t rows, int64_t cols);

// dx always; dgamma when non-null (then `workspace` must hold cuda_rms_backward_workspace_bytes()).
cudaError_t cuda_rms_backward(DType x_type, DType w_type, const void* dy, const void* x, const void* rstd,
                              const void* gamma, void* dx, void* dgamma, void* workspace, int64_t rows,
                              int64_t cols, cudaStream_t stream);

}  // namespace ln
