"""LayerNorm front used everywhere in the model.

`FusedLayerNorm` is a drop-in for torch.nn.LayerNorm (same arguments, same `weight`/`bias`
state_dict keys) and `fused_layer_norm` its functional form. Per device type the backend is, in
order of preference:
  1. our fused kernels in csrc/layer_norm (`megatron_snm._layer_norm` for CPU tensors,
     `megatron_snm._layer_norm_cuda` for CUDA tensors), wrapped in an autograd Function that
     saves the per-row mean and inverse std for the backward pass;
  2. apex's fused LayerNorm, for CUDA tensors where apex is installed;
  3. torch.nn.functional.layer_norm.
The choice is logged once per device type (logger "megatron_snm").
"""
import functools
import importlib
import logging
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_snm.tensor_parallel.layers import sequence_parallel_parameter

logger = logging.getLogger("megatron_snm")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


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


def _import_optional(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@functools.cache
def _backend(device_type):
    """(name, callable(x, normalized_shape, weight, bias, eps)) for tensors on `device_type`."""
    extension = {"cpu": "megatron_snm._layer_norm", "cuda": "megatron_snm._layer_norm_cuda"}.get(device_type)
    if extension is not None and (module := _import_optional(extension)) is not None:
        name, fn = f"fused kernels from csrc/layer_norm ({extension})", functools.partial(_ours, module)
    elif device_type == "cuda" and (apex := _import_optional("apex.normalization.fused_layer_norm")):
        name, fn = "apex FusedLayerNorm", functools.partial(_apex, apex)
    else:
        name, fn = "torch.nn.functional.layer_norm", F.layer_norm
    logger.info("LayerNorm backend for %s tensors: %s", device_type, name)
    return name, fn


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
    if x.dim() < len(normalized_shape) or tuple(x.shape[x.dim() - len(normalized_shape) :]) != normalized_shape:
        raise ValueError(
            f"LayerNorm over the last dimension(s) {list(normalized_shape)} got an input of shape {list(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"LayerNorm: unsupported input dtype {x.dtype} (supported: float32, float64, bfloat16, float16)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != normalized_shape:
            raise ValueError(f"LayerNorm: {name} has shape {list(p.shape)}, expected {list(normalized_shape)}")
        if p.dtype != x.dtype and (p.dtype != torch.float32 or x.dtype == torch.float64):
            raise TypeError(
                f"LayerNorm: {name} is {p.dtype} but the input is {x.dtype}; "
                f"parameters must have the input's dtype or float32"
            )
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"LayerNorm: weight is {weight.dtype} but bias is {bias.dtype}")


def fused_layer_norm(x, weight, bias, eps=1e-5, normalized_shape=None):
    """LayerNorm of `x` over its trailing `normalized_shape` (default: weight's shape, else the
    last dimension), then `* weight + bias` where given. The output has x's dtype; statistics are
    computed in float32 (float64 for float64 input)."""
    if normalized_shape is None:
        normalized_shape = weight.shape if weight is not None else bias.shape if bias is not None else x.shape[-1:]
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    _check(x, normalized_shape, weight, bias)
    return _backend(x.device.type)[1](x, normalized_shape, weight, bias, eps)


class FusedLayerNorm(torch.nn.Module):
    """torch.nn.LayerNorm's interface and parameters, computed by `fused_layer_norm`.

    `sequence_parallel=True`: the input is one TP rank's shard of the sequence, so the gradients of
    weight and bias are summed over the TP ranks (tensor_parallel/layers.sequence_parallel_parameter)."""

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
            init = torch.zeros if zero_centered_gamma else torch.ones
            self.weight = torch.nn.Parameter(init(self.normalized_shape, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self):
        if self.elementwise_affine:
            torch.nn.init.ones_(self.weight)
            torch.nn.init.zeros_(self.bias)

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if self.sequence_parallel:
            weight, bias = sequence_parallel_parameter(weight), sequence_parallel_parameter(bias)
        if self.zero_centered_gamma:
            weight = weight + 1
        return fused_layer_norm(x, weight, bias, self.eps, self.normalized_shape)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
