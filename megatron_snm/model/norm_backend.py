"""The backend choice and input checks that the fused norms share (model/layer_norm.py,
model/rms_norm.py).

Per device type a norm runs, in order of preference, on
  1. our fused kernels in csrc/layer_norm (`megatron_snm._layer_norm` for CPU tensors,
     `megatron_snm._layer_norm_cuda` for CUDA tensors; one extension holds both norms);
  2. apex's fused kernel, for CUDA tensors where apex is installed and has that norm;
  3. torch's own function.
The choice is logged once per norm and device type, in one line (logger "megatron_snm").
"""
import functools
import importlib
import logging

import torch

logger = logging.getLogger("megatron_snm")

EXTENSIONS = {"cpu": "megatron_snm._layer_norm", "cuda": "megatron_snm._layer_norm_cuda"}
APEX_MODULE = "apex.normalization.fused_layer_norm"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def import_optional(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def choose_backend(norm, device_type, ours, apex_function, apex, torch_name, torch_fn):
    """(name, fn) for `norm` ("LayerNorm", "RMSNorm") on `device_type` tensors, logged once by the
    caller's cache. `ours(extension, *args)` runs our kernels, `apex(apex_module, *args)` apex's
    (chosen only where apex's module has `apex_function`), `torch_fn(*args)` torch's."""
    extension = EXTENSIONS.get(device_type)
    if extension is not None and (module := import_optional(extension)) is not None:
        name, fn = f"fused kernels from csrc/layer_norm ({extension})", functools.partial(ours, module)
    elif device_type == "cuda" and hasattr(apex_module := import_optional(APEX_MODULE), apex_function):
        name, fn = f"apex {apex_function}", functools.partial(apex, apex_module)
    else:
        name, fn = torch_name, torch_fn
    logger.info("%s backend for %s tensors: %s", norm, device_type, name)
    return name, fn


def check_input(norm, x, normalized_shape, **params):
    """The errors every norm gives for an input that does not fit its `normalized_shape` and its
    parameters (name=tensor or None): each parameter has that shape and x's dtype or float32."""
    if x.dim() < len(normalized_shape) or tuple(x.shape[x.dim() - len(normalized_shape) :]) != normalized_shape:
        raise ValueError(
            f"{norm} over the last dimension(s) {list(normalized_shape)} got an input of shape {list(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{norm}: unsupported input dtype {x.dtype} (supported: float32, float64, bfloat16, float16)")
    for name, p in params.items():
        if p is None:
            continue
        if tuple(p.shape) != normalized_shape:
            raise ValueError(f"{norm}: {name} has shape {list(p.shape)}, expected {list(normalized_shape)}")
        if p.dtype != x.dtype and (p.dtype != torch.float32 or x.dtype == torch.float64):
            raise TypeError(
                f"{norm}: {name} is {p.dtype} but the input is {x.dtype}; "
                f"parameters must have the input's dtype or float32"
            )


def normalized_shape_of(normalized_shape, weight, x):
    """`normalized_shape` as a tuple; by default the weight's shape, else x's last dimension."""
    if normalized_shape is None:
        normalized_shape = weight.shape if weight is not None else x.shape[-1:]
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
