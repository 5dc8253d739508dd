"""Autograd collectives over the tensor-parallel group (Megatron's `mappings`).

Each forward collective is paired with its adjoint in backward, so that a tensor-parallel layer is
a pure function of the full input and gradients come out right without any bookkeeping:

    copy_to_tensor_model_parallel_region      forward: identity          backward: all-reduce
    reduce_from_tensor_model_parallel_region  forward: all-reduce        backward: identity
    scatter_to_tensor_model_parallel_region   forward: keep my chunk     backward: all-gather
    gather_from_tensor_model_parallel_region  forward: all-gather        backward: keep my chunk

Scatter and gather split the last dimension in TP-rank order. With TP size 1 every function is the
identity. Works on any backend torch.distributed offers (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_snm.parallel import state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=state.get_tensor_model_parallel_group())
    return x


def _split_last_dim(x: torch.Tensor) -> torch.Tensor:
    world = state.get_tensor_model_parallel_world_size()
    if x.shape[-1] % world:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {world}")
    chunk = x.shape[-1] // world
    rank = state.get_tensor_model_parallel_rank()
    return x[..., rank * chunk:(rank + 1) * chunk].contiguous()


def all_gather_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The TP ranks' `x` concatenated along `dim` in TP-rank order (no autograd)."""
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(state.get_tensor_model_parallel_world_size())]
    dist.all_gather(chunks, x, group=state.get_tensor_model_parallel_group())
    return torch.cat(chunks, dim=dim)


def _gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    return all_gather_along(x, -1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x.clone())  # never overwrite a tensor autograd may have saved

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last_dim(grad)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_last_dim(grad)


def _tp_active() -> bool:
    return state.get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _CopyToTP.apply(x) if _tp_active() else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ReduceFromTP.apply(x) if _tp_active() else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _ScatterToTP.apply(x) if _tp_active() else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _GatherFromTP.apply(x) if _tp_active() else x
