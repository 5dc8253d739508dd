// The CPU LayerNorm and RMSNorm kernels as type-erased function pointers over a range of rows,
// compiled once per instruction set (layer_norm_cpu_rows.inc) and chosen at run time by
// layer_norm_cpu.cpp. The RMSNorm set has the same signatures; it ignores beta and mean (null)
// and keeps only dgamma in its partials.
#pragma once

#include <cstdint>

#include "layer_norm_types.h"

namespace ln {

struct KernelSet {
  // `scratch` is per task: room for 3 * cols elements of the accumulation type (float32, or
  // float64 for float64 x) that the kernels use for rows converted to that type.

  // Rows [r0, r1) of y, mean and rstd.
  void (*forward)(const void* x, const void* gamma, const void* beta, void* y, void* mean,
                  void* rstd, void* scratch, int64_t r0, int64_t r1, int64_t cols, double eps);
  // Rows [r0, r1) of dx; backward_with_weight_grads also adds those rows' dgamma and dbeta
  // contributions into partial[0:cols] and partial[cols:2*cols] (accumulation type; RMSNorm:
  // dgamma only).
  void (*backward_with_weight_grads)(const void* dy, const void* x, const void* mean,
                                     const void* rstd, const void* gamma, void* dx, void* partial,
                                     void* scratch, int64_t r0, int64_t r1, int64_t cols);
  void (*backward_dx_only)(const void* dy, const void* x, const void* mean, const void* rstd,
                           const void* gamma, void* dx, void* partial, void* scratch, int64_t r0,
                           int64_t r1, int64_t cols);
  // Columns [c0, c1) of dgamma and dbeta: the sums of `parts` partial buffers laid out as above.
  void (*reduce_partials)(const void* partials, int64_t parts, int64_t cols, void* dgamma,
                          void* dbeta, int64_t c0, int64_t c1);
  // Weight gradients per column, so a partial buffer is grads * cols long: 2 (dgamma, dbeta) for
  // LayerNorm, 1 (dgamma) for RMSNorm.
  int grads;
};

// All-null for an unsupported (x, weight) type pair.
namespace generic {
KernelSet kernel_set(DType x, DType w);
KernelSet rms_kernel_set(DType x, DType w);
}  // namespace generic
namespace avx2 {
KernelSet kernel_set(DType x, DType w);
KernelSet rms_kernel_set(DType x, DType w);
}  // namespace avx2

}  // namespace ln
