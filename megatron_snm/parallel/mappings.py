"""Autograd collectives over the tensor-parallel group (Megatron's `mappings`).

Each forward collective is paired with its adjoint in backward, so that a tensor-parallel layer is
a pure function of the full input and gradients come out right without any bookkeeping:

    copy_to_tensor_model_parallel_region      forward: identity          backward: all-reduce
    reduce_from_tensor_model_parallel_region  forward: all-reduce        backward: identity
    scatter_to_tensor_model_parallel_region   forward: keep my chunk     backward: all-gather
    gather_from_tensor_model_parallel_region  forward: all-gather        backward: keep my chunk

Scatter and gather split the last dimension in TP-rank order.

Sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models"; Megatron's --sequence-parallel) splits the activations outside the tensor-parallel layers
along the sequence instead of replicating them. Its three collectives split or join a given
dimension `dim` (the caller's sequence dimension), in TP-rank order:

    scatter_to_sequence_parallel_region         forward: keep my chunk     backward: all-gather
    gather_from_sequence_parallel_region        forward: all-gather        backward: reduce-scatter
    reduce_scatter_to_sequence_parallel_region  forward: reduce-scatter    backward: all-gather

The gather's backward reduce-scatters: what reads the gathered tensor (a column-parallel layer) works
on this rank's slice of the weight, so each rank's gradient of it is one term of a sum over the
ranks, of which each keeps its chunk. With TP size 1 every function is the identity. Works on any backend
torch.distributed offers (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_snm.parallel import state


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=state.get_tensor_model_parallel_group())
    return x


def all_gather_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The TP ranks' `x` concatenated along `dim` in TP-rank order (no autograd)."""
    x = x.contiguous()
    chunks = [torch.empty_like(x) for _ in range(state.get_tensor_model_parallel_world_size())]
    dist.all_gather(chunks, x, group=state.get_tensor_model_parallel_group())
    return torch.cat(chunks, dim=dim)


def _chunks(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    world = state.get_tensor_model_parallel_world_size()
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim)


def split_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This TP rank's chunk of `x` along `dim` (no autograd)."""
    return _chunks(x, dim)[state.get_tensor_model_parallel_rank()].contiguous()


def reduce_scatter_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The sum over the TP ranks of `x`, of which this rank keeps its chunk along `dim` (no autograd)."""
    chunks = [chunk.contiguous() for chunk in _chunks(x, dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=state.get_tensor_model_parallel_group())
    return out


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
        return split_along(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, -1)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_gather_along(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return split_along(grad, -1)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return split_along(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return all_gather_along(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_along(grad, ctx.dim), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return reduce_scatter_along(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along(grad, ctx.dim), None


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


def scatter_to_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _ScatterToSP.apply(x, dim) if _tp_active() else x


def gather_from_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _GatherFromSP.apply(x, dim) if _tp_active() else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, dim: int) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x, dim) if _tp_active() else x
