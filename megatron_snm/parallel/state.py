"""Process groups for tensor (TP), pipeline (PP) and data (DP) parallelism.

world = TP x PP x DP in Megatron's rank order: TP varies fastest, then DP, then PP, so
rank = pp_rank * (DP * TP) + dp_rank * TP + tp_rank. This is also DeepSpeed's
`PipeModelDataParallelTopology` order (axes pipe, data, model), so DeepSpeed's pipeline engine
and our groups agree on who is who.

Nothing here knows about GPT. The sizes are a `ParallelDims` (parallel/dims.py), checked before
any group is made; the model config checks what must divide by TP (heads, FFN, vocabulary padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_snm.parallel.dims import ParallelDims


@dataclass
class _Groups:
    tp_size: int
    pp_size: int
    dp_size: int
    tp_group: object
    pp_group: object
    dp_group: object
    model_parallel_group: object  # TP x PP: everyone holding a piece of one model replica
    pp_ranks: list  # global ranks of this rank's pipeline, stage order
    tp_ranks: list
    dp_ranks: list


_GROUPS: _Groups | None = None


def rank_of(tp: int, dp: int, pp: int, tp_size: int, dp_size: int) -> int:
    return pp * dp_size * tp_size + dp * tp_size + tp


def initialize_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> ParallelDims:
    """Creates the TP, PP, DP and model-parallel groups and returns their sizes. Requires
    torch.distributed initialised. Every rank must call this (new_group is collective), in the same
    order.
    """
    global _GROUPS
    world, me = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.of_world(world, tensor_parallel_size, pipeline_parallel_size)
    tp, pp, dp = dims.tensor, dims.pipeline, dims.data

    def groups_of(rank_lists):
        mine, mine_ranks = None, None
        for ranks in rank_lists:
            g = dist.new_group(ranks)
            if me in ranks:
                mine, mine_ranks = g, ranks
        return mine, mine_ranks

    tp_group, tp_ranks = groups_of(
        [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    )
    dp_group, dp_ranks = groups_of(
        [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    )
    pp_group, pp_ranks = groups_of(
        [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    )
    mp_group, _ = groups_of(
        [[rank_of(t, d, p, tp, dp) for p in range(pp) for t in range(tp)] for d in range(dp)]
    )
    _GROUPS = _Groups(tp, pp, dp, tp_group, pp_group, dp_group, mp_group, pp_ranks, tp_ranks, dp_ranks)
    return dims


def is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    global _GROUPS
    _GROUPS = None


def collective_device(group=None) -> torch.device:
    """Where a tensor must be to take part in `group`'s collectives: NCCL takes only CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _groups() -> _Groups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialised: call initialize_model_parallel() first")
    return _GROUPS


# Tensor parallel. Without initialisation (a single process, a unit test of one layer) the
# model behaves as TP=1 so layers can be used on their own.
def get_tensor_model_parallel_world_size() -> int:
    return _GROUPS.tp_size if _GROUPS else 1


def get_tensor_model_parallel_rank() -> int:
    return _GROUPS.tp_ranks.index(dist.get_rank()) if _GROUPS else 0


def get_tensor_model_parallel_group():
    return _groups().tp_group


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP rank 0 in this rank's TP group (for broadcasting batches)."""
    return _groups().tp_ranks[0]


# Pipeline parallel.
def get_pipeline_model_parallel_world_size() -> int:
    return _GROUPS.pp_size if _GROUPS else 1


def get_pipeline_model_parallel_rank() -> int:
    return _GROUPS.pp_ranks.index(dist.get_rank()) if _GROUPS else 0


def get_pipeline_model_parallel_group():
    return _groups().pp_group


def get_pipeline_model_parallel_ranks() -> list:
    return list(_groups().pp_ranks)


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


# Data parallel.
def get_data_parallel_world_size() -> int:
    return _GROUPS.dp_size if _GROUPS else 1


def get_data_parallel_rank() -> int:
    return _GROUPS.dp_ranks.index(dist.get_rank()) if _GROUPS else 0


def get_data_parallel_group():
    return _groups().dp_group


# Model parallel (TP x PP), the unit DeepSpeed calls "model parallel" when given an mpu.
def get_model_parallel_group():
    return _groups().model_parallel_group
