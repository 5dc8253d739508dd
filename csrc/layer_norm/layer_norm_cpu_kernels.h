// The CPU LayerNorm kernels as type-erased function pointers over a range of rows, compiled once
// per instruction set (layer_norm_cpu_rows.inc) and chosen at run time by layer_norm_cpu.cpp.
#pragma once

#include <cstdint>

#include "layer_norm_types.h"

namespace ln {

struct KernelSet {
  // Rows [r0, r1) of y, mean and rstd.
  void (*forward)(const void* x, const void* gamma, const void* beta, void* y, void* mean,
                  void* rstd, int64_t r0, int64_t r1, int64_t cols, double eps);
  // Rows [r0, r1) of dx; backward_with_weight_grads also adds those rows' dgamma and dbeta
  // contributions into partial[0:cols] and partial[cols:2*cols] (accumulation type).
  void (*backward_with_weight_grads)(const void* dy, const void* x, const void* mean,
                                     const void* rstd, const void* gamma, void* dx, void* partial,
                                     int64_t r0, int64_t r1, int64_t cols);
  void (*backward_dx_only)(const void* dy, const void* x, const void* mean, const void* rstd,
                           const void* gamma, void* dx, void* partial, int64_t r0, int64_t r1,
                           int64_t cols);
  // Columns [c0, c1) of dgamma and dbeta: the sums of `parts` partial buffers laid out as above.
  void (*reduce_partials)(const void* partials, int64_t parts, int64_t cols, void* dgamma,
                          void* dbeta, int64_t c0, int64_t c1);
};

// All-null for an unsupported (x, weight) type pair.
namespace generic { KernelSet kernel_set(DType x, DType w); }
namespace avx2 { KernelSet kernel_set(DType x, DType w); }

}  // namespace ln
