// Checks and unpacks the torch tensors handed to the fused LayerNorm, for both the CPU bindings
// and the CUDA glue, so the two reject bad input with the same messages.
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
      TORCH_CHECK(false, "fused LayerNorm: unsupported dtype ", t,
                  " (supported: float32, float64, bfloat16, float16)");
  }
}

// x is [rows, cols]; weight and bias are [cols], both float32 or x's dtype (float64 x: float64).
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2, "fused LayerNorm: expected x as [rows, cols], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "fused LayerNorm: weight of shape ",
              weight.sizes(), " does not match the last dimension of x ", x.sizes());
  TORCH_CHECK(bias.sizes() == weight.sizes(), "fused LayerNorm: bias of shape ", bias.sizes(),
              " does not match weight ", weight.sizes());
  TORCH_CHECK(bias.scalar_type() == weight.scalar_type(), "fused LayerNorm: weight is ",
              weight.scalar_type(), " but bias is ", bias.scalar_type());
  TORCH_CHECK(x.device() == weight.device() && x.device() == bias.device(),
              "fused LayerNorm: x, weight and bias must be on one device");
  to_dtype(x.scalar_type());
  const bool mixed_ok = weight.scalar_type() == at::kFloat && x.scalar_type() != at::kDouble;
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || mixed_ok, "fused LayerNorm: ",
              x.scalar_type(), " input needs ", x.scalar_type(), " or float32 weights, got ",
              weight.scalar_type());
}

inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                const at::Tensor& rstd, const at::Tensor& weight) {
  check_forward_args(x, weight, weight);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "fused LayerNorm: grad of shape ", dy.sizes(), " ", dy.scalar_type(),
              " does not match x ", x.sizes(), " ", x.scalar_type());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == x.size(0) && s->scalar_type() == stats_dtype(x) &&
                    s->is_contiguous() && s->device() == x.device(),
                "fused LayerNorm: mean/rstd must be contiguous ", stats_dtype(x), " of shape [",
                x.size(0), "]");
  }
}

}  // namespace ln
