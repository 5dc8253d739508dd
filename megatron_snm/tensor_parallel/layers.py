"""Megatron's tensor-parallel layers. They know nothing of GPT.

Each layer's weight is one slice of a full ("master") weight. Initialisation builds the full weight
with the given `init_fn` (a function that fills a tensor in place; give it its own seeded
generator to make the weights independent of the TP size and of what else a process builds) and
keeps this rank's slice, so TP=1 and TP=k start from identical full weights. On the meta device
nothing is allocated or initialised.

The TP size is given at construction (`tp_size`), so a layer's shape never depends on whether
process groups exist yet; this rank's place in the TP group is read from parallel/state.py, and
the two must agree.

    ColumnParallelLinear   Y = X A^T + b, A split by output rows:  Y_i = X A_i^T + b_i  (no comm forward)
    RowParallelLinear      Y = X A^T + b, A split by input columns: Y = sum_i X_i A_i^T + b  (all-reduce)
    VocabParallelEmbedding rows of the table split by vocabulary range; out-of-range ids give zeros,
                           and an all-reduce sums the ranks' partial lookups.
A column-parallel layer followed by a row-parallel one (attention QKV -> W_O, MLP W_1 -> W_2) needs
one all-reduce in forward and one in backward.

With `sequence_parallel=True` (Megatron's --sequence-parallel) the activations outside these layers
are split along the sequence (SEQUENCE_DIM) over the TP ranks instead of replicated, and each
all-reduce becomes an all-gather plus a reduce-scatter, which move the same bytes:
    ColumnParallelLinear   input: this rank's sequence shard, all-gathered in forward (and again in
                           backward, so only the shard is stored); its gradient is reduce-scattered
    RowParallelLinear      output reduce-scattered to this rank's sequence shard (not all-reduced)
    VocabParallelEmbedding partial lookups reduce-scattered to this rank's sequence shard
A replicated parameter applied to a sequence shard (the row-parallel bias, a LayerNorm's gain and
bias) gets only its shard's part of the gradient: `sequence_parallel_parameter` sums it over TP.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from megatron_snm.parallel import state
from megatron_snm.parallel.mappings import (
    all_gather_along,
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_along,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_snm.tensor_parallel.utils import divide, mark_tensor_parallel, vocab_range

InitFn = Callable[[torch.Tensor], object]  # fills a full fp32 weight in place
SEQUENCE_DIM = 1  # the layers' activations are [batch, sequence, features]


def sequence_parallel_parameter(param: torch.Tensor | None) -> torch.Tensor | None:
    """`param`, replicated over TP, as used on this rank's sequence shard: its gradient here covers
    only this rank's tokens, so the backward pass sums it over the TP ranks. (Megatron all-reduces
    these gradients after the backward pass; summing them in the graph gives every reader of a
    gradient, DeepSpeed's reduction and norm, ZeRO's partitions, the stability monitor, the full one
    with nothing to call from the training loop, at one small all-reduce per use.)"""
    return None if param is None else copy_to_tensor_model_parallel_region(param)


class _SequenceParallelLinear(torch.autograd.Function):
    """F.linear of the input all-gathered along the sequence. Only this rank's shard of the input is
    saved, and gathered again in backward: storing the gathered input would keep the replicated
    activation that sequence parallelism exists to split."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(all_gather_along(x, SEQUENCE_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, _ = ctx.needs_input_grad
        grad_x = reduce_scatter_along(grad.matmul(weight), SEQUENCE_DIM) if need_x else None
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_rows.t().matmul(all_gather_along(x, SEQUENCE_DIM).reshape(-1, x.shape[-1])) \
            if need_weight else None
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           sequence_parallel: bool = False) -> torch.Tensor:
    """x A_i^T + b_i for this rank's rows A_i of a column-parallel weight. `x`: the full activation,
    or with `sequence_parallel` this rank's sequence shard of it; the output covers the whole sequence."""
    if sequence_parallel and state.get_tensor_model_parallel_world_size() > 1:
        return _SequenceParallelLinear.apply(x, weight, bias)
    return F.linear(copy_to_tensor_model_parallel_region(x), weight, bias)


def _tp_rank(tp_size: int) -> int:
    """This rank's place in its TP group, checked against the layer's `tp_size`. A layer of TP size 1
    built on the meta device holds no values, so any process may build one: that is how a model
    describes its layout-free form (model/describe.py)."""
    if tp_size == 1 and torch.empty(0).device.type == "meta":
        return 0
    if state.get_tensor_model_parallel_world_size() != tp_size:
        raise ValueError(f"layer built for tensor-parallel size {tp_size}, but the process groups have "
                         f"{state.get_tensor_model_parallel_world_size()} (--tensor-model-parallel-size)")
    return state.get_tensor_model_parallel_rank()


def _partitioned_parameter(full_shape, partition_dim, init_fn: InitFn, dtype, tp_size: int) -> torch.nn.Parameter:
    """This rank's slice of a full weight initialised by `init_fn`."""
    world, rank = tp_size, _tp_rank(tp_size)
    local_shape = list(full_shape)
    local_shape[partition_dim] = divide(full_shape[partition_dim], world, f"dimension {partition_dim} of {tuple(full_shape)}")
    param = torch.nn.Parameter(torch.empty(local_shape, dtype=dtype))  # honours a `with torch.device(...)`
    param.partition_dim = partition_dim  # also at TP 1: the dimension a larger TP would split (model/describe.py)
    if world > 1:
        mark_tensor_parallel(param, partition_dim)
    if param.device.type != "meta":
        master = torch.empty(full_shape, dtype=torch.float32, device="cpu")  # generators there are device-independent
        init_fn(master)
        size = local_shape[partition_dim]
        with torch.no_grad():
            param.copy_(master.narrow(partition_dim, rank * size, size))
    return param


def _zero_bias(size: int, dtype, partition_dim: int | None, tp_size: int) -> torch.nn.Parameter:
    bias = torch.nn.Parameter(torch.zeros(size, dtype=dtype))
    if partition_dim is not None:
        bias.partition_dim = partition_dim
    if partition_dim is not None and tp_size > 1:
        mark_tensor_parallel(bias, partition_dim)
    return bias


class ColumnParallelLinear(torch.nn.Module):
    """Linear layer with the output features split over TP ranks.

    Input: the full activation (replicated), or with `sequence_parallel` this rank's sequence shard.
    Output: this rank's output features over the whole sequence, or all of them with `gather_output=True`.
    """

    def __init__(self, in_features: int, out_features: int, *, init_fn: InitFn, tp_size: int = 1, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.weight = _partitioned_parameter((out_features, in_features), 0, init_fn, params_dtype, tp_size)
        self.bias = _zero_bias(divide(out_features, tp_size, "output features"), params_dtype, 0, tp_size) \
            if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = column_parallel_linear(x, self.weight, self.bias, self.sequence_parallel)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(torch.nn.Module):
    """Linear layer with the input features split over TP ranks.

    Input: this rank's input features (`input_is_parallel=True`, e.g. after a ColumnParallelLinear)
    or the full activation, which is then split. Output: the full activation (replicated), or with
    `sequence_parallel` (which needs `input_is_parallel`) this rank's sequence shard of it; the bias
    is added once, after the all-reduce (reduce-scatter).
    """

    def __init__(self, in_features: int, out_features: int, *, init_fn: InitFn, tp_size: int = 1, bias: bool = True,
                 input_is_parallel: bool = False, sequence_parallel: bool = False,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear needs input_is_parallel=True (Megatron's rule)")
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = _partitioned_parameter((out_features, in_features), 1, init_fn, params_dtype, tp_size)
        self.bias = _zero_bias(out_features, params_dtype, None, tp_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, SEQUENCE_DIM)
            return y + sequence_parallel_parameter(self.bias) if self.bias is not None else y
        y = reduce_from_tensor_model_parallel_region(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table with the vocabulary (rows) split over TP ranks.

    `num_embeddings` must already be padded to a multiple of the TP size (GPT pads to a multiple of
    128 x TP). Output: the full embedding (replicated), or with `sequence_parallel` this rank's
    sequence shard of it.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_fn: InitFn, tp_size: int = 1,
                 sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.tp_size, self.sequence_parallel = num_embeddings, tp_size, sequence_parallel
        self.vocab_start, self.vocab_end = vocab_range(num_embeddings, _tp_rank(tp_size), tp_size)
        self.weight = _partitioned_parameter((num_embeddings, embedding_dim), 0, init_fn, params_dtype, tp_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, SEQUENCE_DIM)
        return reduce_from_tensor_model_parallel_region(partial)
