"""RMSNorm front, for the models built with --normalization RMSNorm.

`FusedRMSNorm` is a drop-in for torch.nn.RMSNorm (same `weight` state_dict key, no bias) and
`fused_rms_norm` its functional form: y = x / sqrt(mean(x^2) + eps) * weight over the trailing
`normalized_shape`. Per device type the backend is, in order of preference (model/norm_backend.py,
shared with LayerNorm):
  1. our fused kernels in csrc/layer_norm (`megatron_snm._layer_norm` for CPU tensors,
     `megatron_snm._layer_norm_cuda` for CUDA tensors), wrapped in an autograd Function that
     saves the per-row inverse RMS for the backward pass;
  2. apex's fused RMSNorm, for CUDA tensors where apex is installed and has it;
  3. torch.nn.functional.rms_norm.
The choice is logged once per device type (logger "megatron_snm").
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_snm.model.norm_backend import check_input, choose_backend, normalized_shape_of
from megatron_snm.tensor_parallel.layers import sequence_parallel_parameter


class _FusedRMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x) * weight over the last dimension of a [rows, cols] x, by one of our extensions."""

    @staticmethod
    def forward(ctx, x, weight, eps, extension):
        y, rstd = extension.rms_forward(x, weight, eps)
        ctx.extension = extension
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dweight = ctx.needs_input_grad[:2]
        dx, dweight = ctx.extension.rms_backward(dy.contiguous(), x, rstd, weight, need_dweight)
        return dx if need_dx else None, dweight if need_dweight else None, None, None


@functools.cache
def _backend(device_type):
    """(name, callable(x, normalized_shape, weight, eps)) for tensors on `device_type`."""
    return choose_backend("RMSNorm", device_type, _ours, "fused_rms_norm_affine", _apex,
                          "torch.nn.functional.rms_norm", F.rms_norm)


def backend_name(device_type):
    """Which backend RMSNorm uses for tensors on `device_type` ("cpu", "cuda", ...)."""
    return _backend(device_type)[0]


def _ours(extension, x, normalized_shape, weight, eps):
    if weight is None:
        weight = torch.ones(normalized_shape, dtype=x.dtype, device=x.device)
    # The kernels see [rows, cols] and [cols]; reshape only when needed (microseconds of Python
    # that small, GPU-bound calls notice).
    if len(normalized_shape) > 1:
        weight = weight.reshape(math.prod(normalized_shape))
    if x.dim() == 2 and len(normalized_shape) == 1:
        return _FusedRMSNormFunction.apply(x, weight, eps, extension)
    y = _FusedRMSNormFunction.apply(x.reshape(-1, weight.numel()), weight, eps, extension)
    return y.view(x.shape)


def _apex(apex, x, normalized_shape, weight, eps):
    if weight is None:
        return apex.fused_rms_norm(x, normalized_shape, eps)
    if weight.dtype != x.dtype:
        if hasattr(apex, "mixed_dtype_fused_rms_norm_affine"):
            return apex.mixed_dtype_fused_rms_norm_affine(x, weight, normalized_shape, eps)
        weight = weight.to(x.dtype)  # older apex: no mixed-dtype RMSNorm; autograd casts the gradient back
    return apex.fused_rms_norm_affine(x, weight, normalized_shape, eps)


def fused_rms_norm(x, weight, eps=1e-5, normalized_shape=None):
    """RMSNorm of `x` over its trailing `normalized_shape` (default: weight's shape, else the last
    dimension), then `* weight` where given. The output has x's dtype; the statistic is computed
    in float32 (float64 for float64 input)."""
    normalized_shape = normalized_shape_of(normalized_shape, weight, x)
    check_input("RMSNorm", x, normalized_shape, weight=weight)
    return _backend(x.device.type)[1](x, normalized_shape, weight, eps)


class FusedRMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm's interface and parameter (`weight`), computed by `fused_rms_norm`.

    `sequence_parallel=True`: the input is one TP rank's shard of the sequence, so the weight's
    gradient is summed over the TP ranks (tensor_parallel/layers.sequence_parallel_parameter).
    `zero_centered_gamma=True` is Megatron's --apply-layernorm-1p (layernorm_zero_centered_gamma):
    the stored weight is gamma - 1, initialised to zeros, and the norm multiplies by weight + 1;
    such a state_dict is not torch.nn.RMSNorm's."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, device=None, dtype=None,
                 sequence_parallel=False, zero_centered_gamma=False):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.sequence_parallel = sequence_parallel
        self.zero_centered_gamma = zero_centered_gamma
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self):
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 0.0 if self.zero_centered_gamma else 1.0)

    def forward(self, x):
        weight = self.weight
        if self.sequence_parallel:
            weight = sequence_parallel_parameter(weight)
        if self.zero_centered_gamma and weight is not None:
            weight = weight + 1
        return fused_rms_norm(x, weight, self.eps, self.normalized_shape)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (", zero_centered_gamma=True" if self.zero_centered_gamma else ""))
