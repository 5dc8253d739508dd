"""LayerNorm front used everywhere in the model.

`FusedLayerNorm` is a drop-in for torch.nn.LayerNorm (same arguments, same `weight`/`bias`
state_dict keys) and `fused_layer_norm` its functional form. Per device type the backend is, in
order of preference (model/norm_backend.py, shared with RMSNorm):
  1. our fused kernels in csrc/layer_norm (`megatron_snm._layer_norm` for CPU tensors,
     `megatron_snm._layer_norm_cuda` for CUDA tensors), wrapped in an autograd Function that
     saves the per-row mean and inverse std for the backward pass;
  2. apex's fused LayerNorm, for CUDA tensors where apex is installed;
  3. torch.nn.functional.layer_norm.
The choice is logged once per device type (logger "megatron_snm").
"""
import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_snm.model.norm_backend import check_input, choose_backend, normalized_shape_of
from megatron_snm.tensor_parallel.layers import sequence_parallel_parameter


class _FusedLayerNormFunction(torch.autograd.Function):
    """y = LayerNorm(x) over the last dimension of a [rows, cols] x, by one of our extensions."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, extension):
        y, mean, rstd = extension.forward(x, weight, bias, eps)
        ctx.extension = extension
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
        dx, dweight, dbias = ctx.extension.backward(
            dy.contiguous(), x, mean, rstd, weight, need_dweight or need_dbias
        )
        return (
            dx if need_dx else None,
            dweight if need_dweight else None,
            dbias if need_dbias else None,
            None,
            None,
        )


@functools.cache
def _backend(device_type):
    """(name, callable(x, normalized_shape, weight, bias, eps)) for tensors on `device_type`."""
    return choose_backend("LayerNorm", device_type, _ours, "fused_layer_norm_affine", _apex,
                          "torch.nn.functional.layer_norm", F.layer_norm)


def backend_name(device_type):
    """Which backend LayerNorm uses for tensors on `device_type` ("cpu", "cuda", ...)."""
    return _backend(device_type)[0]


def _affine_or_identity(x, normalized_shape, weight, bias):
    """weight and bias as given, or the ones/zeros that make the affine step an identity."""
    dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else x.dtype
    if weight is None:
        weight = torch.ones(normalized_shape, dtype=dtype, device=x.device)
    if bias is None:
        bias = torch.zeros(normalized_shape, dtype=dtype, device=x.device)
    return weight, bias


def _ours(extension, x, normalized_shape, weight, bias, eps):
    weight, bias = _affine_or_identity(x, normalized_shape, weight, bias)
    # The kernels see [rows, cols] and [cols]; reshape only when needed, as each costs
    # microseconds of Python that small, GPU-bound calls notice.
    if len(normalized_shape) > 1:
        cols = math.prod(normalized_shape)
        weight, bias = weight.reshape(cols), bias.reshape(cols)
    if x.dim() == 2 and len(normalized_shape) == 1:
        return _FusedLayerNormFunction.apply(x, weight, bias, eps, extension)
    y = _FusedLayerNormFunction.apply(x.reshape(-1, weight.numel()), weight, bias, eps, extension)
    return y.view(x.shape)


def _apex(apex, x, normalized_shape, weight, bias, eps):
    if weight is None and bias is None:
        return apex.fused_layer_norm(x, normalized_shape, eps)
    weight, bias = _affine_or_identity(x, normalized_shape, weight, bias)
    if weight.dtype != x.dtype:
        return apex.mixed_dtype_fused_layer_norm_affine(x, weight, bias, normalized_shape, eps)
    return apex.fused_layer_norm_affine(x, weight, bias, normalized_shape, eps)


def _check(x, normalized_shape, weight, bias):
    check_input("LayerNorm", x, normalized_shape, weight=weight, bias=bias)
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"LayerNorm: weight is {weight.dtype} but bias is {bias.dtype}")


def fused_layer_norm(x, weight, bias, eps=1e-5, normalized_shape=None):
    """LayerNorm of `x` over its trailing `normalized_shape` (default: weight's shape, else the
    last dimension), then `* weight + bias` where given. The output has x's dtype; statistics are
    computed in float32 (float64 for float64 input)."""
    normalized_shape = normalized_shape_of(normalized_shape, weight if weight is not None else bias, x)
    _check(x, normalized_shape, weight, bias)
    return _backend(x.device.type)[1](x, normalized_shape, weight, bias, eps)


class FusedLayerNorm(torch.nn.Module):
    """torch.nn.LayerNorm's interface and parameters, computed by `fused_layer_norm`.

    `sequence_parallel=True`: the input is one TP rank's shard of the sequence, so the gradients of
    weight and bias are summed over the TP ranks (tensor_parallel/layers.sequence_parallel_parameter).
    `zero_centered_gamma=True` is Megatron's --apply-layernorm-1p (layernorm_zero_centered_gamma):
    the stored weight is gamma - 1, initialised to zeros, and the norm multiplies by weight + 1;
    such a state_dict is not torch.nn.LayerNorm's."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, device=None, dtype=None,
                 sequence_parallel=False, zero_centered_gamma=False):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.zero_centered_gamma = zero_centered_gamma
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            self.reset_parameters()
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self):
        if self.elementwise_affine:
            torch.nn.init.constant_(self.weight, 0.0 if self.zero_centered_gamma else 1.0)
            torch.nn.init.zeros_(self.bias)

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.sequence_parallel:
            weight, bias = sequence_parallel_parameter(weight), sequence_parallel_parameter(bias)
        if self.zero_centered_gamma and weight is not None:
            weight = weight + 1
        return fused_layer_norm(x, weight, bias, self.eps, self.normalized_shape)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + (", zero_centered_gamma=True" if self.zero_centered_gamma else ""))
