"""Small helpers shared by the tensor-parallel layers: divisibility, vocabulary ranges, and the
attributes that mark a parameter as split across TP ranks."""
from __future__ import annotations

import torch

from megatron_snm.parallel import state
from megatron_snm.parallel.mappings import all_gather_along


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ValueError(f"{what} {numerator} is not divisible by {denominator}")
    return numerator // denominator


def vocab_range(padded_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary rows held by TP rank `rank`."""
    per_rank = divide(padded_vocab_size, world_size, "padded vocabulary size")
    return rank * per_rank, (rank + 1) * per_rank


def mark_tensor_parallel(param: torch.nn.Parameter, partition_dim: int) -> None:
    """Marks `param` as this rank's slice of a larger weight, split along `partition_dim` (Megatron's
    attribute names, which DeepSpeed and checkpoint tools also read)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_model_parallel", False)


def gather_full(param: torch.Tensor) -> torch.Tensor:
    """The full (all TP ranks') tensor for a split parameter or its gradient; replicated ones are
    returned as they are. Pass the parameter itself (its attributes say how it is split) or, for a
    gradient, call `gather_full_like(param, param.grad)`."""
    return gather_full_like(param, param)


def gather_full_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    world = state.get_tensor_model_parallel_world_size()
    if world == 1 or not is_tensor_parallel(param):
        return tensor
    return all_gather_along(tensor, param.partition_dim)
