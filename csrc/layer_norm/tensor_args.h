// Checks and unpacks the torch tensors handed to the fused LayerNorm and RMSNorm, for both the CPU
// bindings and the CUDA glue, so the two reject bad input with the same messages.
#pragma once

#include <torch/extension.h>

#include "layer_norm_types.h"

namespace ln {

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused LayerNorm/RMSNorm: unsupported dtype ", t,
                  " (supported: float32, float64, bfloat16, float16)");
  }
}

// x is [rows, cols]; weight is [cols], float32 or x's dtype (float64 x: float64). `norm` names the
// caller in the messages.
inline void check_input_and_weight(const char* norm, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, norm, ": expected x as [rows, cols], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), norm, ": weight of shape ",
              weight.sizes(), " does not match the last dimension of x ", x.sizes());
  TORCH_CHECK(x.device() == weight.device(), norm, ": x and weight must be on one device");
  to_dtype(x.scalar_type());
  const bool mixed_ok = weight.scalar_type() == at::kFloat && x.scalar_type() != at::kDouble;
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || mixed_ok, norm, ": ", x.scalar_type(),
              " input needs ", x.scalar_type(), " or float32 weights, got ", weight.scalar_type());
}

// LayerNorm: x, weight as above; bias like weight.
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_input_and_weight("fused LayerNorm", x, weight);
  TORCH_CHECK(bias.sizes() == weight.sizes(), "fused LayerNorm: bias of shape ", bias.sizes(),
              " does not match weight ", weight.sizes());
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type(), "fused LayerNorm: weight is ",
              weight.scalar_type(), " but bias is ", bias.scalar_type());
  TORCH_CHECK(x.device() == bias.device(), "fused LayerNorm: x, weight and bias must be on one device");
}

inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// dy like x; each per-row statistic (mean, rstd) a contiguous [rows] of stats_dtype(x).
inline void check_grad_and_stats(const char* norm, const at::Tensor& dy, const at::Tensor& x,
                                 std::initializer_list<const at::Tensor*> stats) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), norm, ": grad of shape ",
              dy.sizes(), " ", dy.scalar_type(), " does not match x ", x.sizes(), " ", x.scalar_type());
  for (const at::Tensor* s : stats) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0) && s->scalar_type() == stats_dtype(x) &&
                    s->is_contiguous() && s->device() == x.device(),
                norm, ": the saved statistics must be contiguous ", stats_dtype(x), " of shape [",
                x.size(0), "]");
  }
}

inline void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& weight) {
  check_input_and_weight("fused LayerNorm", x, weight);
  check_grad_and_stats("fused LayerNorm", dy, x, {&mean, &rstd});
}

inline void check_rms_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
                                    const at::Tensor& weight) {
  check_input_and_weight("fused RMSNorm", x, weight);
  check_grad_and_stats("fused RMSNorm", dy, x, {&rstd});
}

}  // namespace ln
