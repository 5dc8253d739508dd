"""Resuming under another layout: a checkpoint saved with TP=a, PP=b, DP=c, ZeRO stage s restored
into a run of TP=a', PP=b', DP=c', ZeRO s' (weights and Adam's state; the LR schedule, data
position and spike state come from megatron_snm.json as in every resume).

    load_resharded(ds_engine, checkpoint_dir, ...)  # after the engine of the new layout is built

Each model file of a checkpoint holds a record of its rank's layout (save_load.layout_record).
The checkpoint is read layout-free (checkpoint/training_state.py: every tensor whole) and each
rank takes its piece: its TP slice (checkpoint/layout.py), then as its ZeRO stage keeps it --
ZeRO 0 in the parameters and the optimizer's per-parameter state (of the fp32 copies, inside
DeepSpeed's fp16/bf16 wrapper), ZeRO 1-2 and bf16's BF16_Optimizer in the flat fp32 partitions
(DeepSpeed's safe_set_full_* API puts each parameter's fragment in place), ZeRO 3 in each
parameter's own partition. RNG states are per rank and mean nothing in another layout: they
are not restored (dropout draws other masks than an unchanged resume would; nothing else differs).

Every rank reads the files of the whole state, memory-mapped (page cache, shared by a node's
ranks), and joins one tensor at a time as it takes its piece: its own memory grows by about one
tensor (benchmarks/reshard_memory.py).
"""
from __future__ import annotations

import math

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from megatron_snm.checkpoint.layout import resize_rows, tensor_parallel_slice
from megatron_snm.checkpoint.training_state import MOMENTS, TrainingState, read_training_state
from megatron_snm.model.describe import ModelDescription
from megatron_snm.parallel import state
from megatron_snm.pipeline.module import full_parameter_names


def load_resharded(ds_engine, checkpoint_dir: str, model: ModelDescription, optimizer: bool) -> TrainingState:
    """Puts the checkpoint's weights (and with `optimizer` Adam's state and DeepSpeed's step
    counters) into this rank's engine, whatever layout either has. `model`: this run's description
    (its vocabulary padding). No collectives: each rank reads what it needs."""
    saved = read_training_state(checkpoint_dir, moments=optimizer)
    tp_size, tp_rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
    zero = ds_engine.zero_optimization_stage()

    tables = model.vocabulary_tables()

    def local(name: str, tensor: torch.Tensor, weight: bool) -> torch.Tensor:
        if name in tables:  # this layout's vocabulary padding
            tensor = resize_rows(tensor, model.vocab_rows, fill="mean" if weight else "zero")
        return tensor_parallel_slice(model, name, tensor, tp_size, tp_rank)

    # ZeRO 1-2 and DeepSpeed's BF16_Optimizer keep flat fp32 partitions, mapped to each parameter.
    flat = zero in (1, 2) or isinstance(ds_engine.optimizer, BF16_Optimizer)
    if optimizer and (flat or zero == 3):
        _create_flat_moments(ds_engine, saved.step)
    masters = _zero0_masters(ds_engine.optimizer) if not (flat or zero == 3) else {}
    params = dict(ds_engine.module.named_parameters())
    with torch.no_grad():
        for module_name, name in full_parameter_names(ds_engine.module, model).items():
            param, weight = params[module_name], local(name, saved.weights[name], weight=True)
            moments = {key: local(name, saved.moments[key][name], weight=False) for key in saved.moments}
            if zero == 3:
                _set_zero3(ds_engine.optimizer, param, weight, moments)
                continue
            param.copy_(weight)
            if not flat:
                stepped, adam = masters[id(param)]
                if stepped is not param:
                    stepped.copy_(weight)
                if moments:
                    adam.state[stepped] = dict(
                        step=torch.tensor(saved.step, dtype=torch.float32, device=param.device),
                        **{key: value.to(param.device, torch.float32).clone() for key, value in moments.items()})
            else:
                safe_set_full_fp32_param(param, weight)
                for key, value in moments.items():
                    safe_set_full_optimizer_state(param, value, key)
    if optimizer:
        for key, value in saved.engine_counters.items():
            setattr(ds_engine, key, value)
    return saved


def _zero0_masters(optimizer) -> dict[int, tuple[torch.Tensor, torch.optim.Optimizer]]:
    """{id(model parameter): (the tensor Adam steps, the torch optimizer holding its state)}
    without ZeRO: the parameter itself in an fp32 run, the fp32 copy inside DeepSpeed's bf16/fp16
    wrapper otherwise."""
    if hasattr(optimizer, "fp32_groups"):
        return {id(lp): (hp, optimizer.optimizer) for lps, hps in zip(optimizer.fp16_groups, optimizer.fp32_groups)
                for lp, hp in zip(lps, hps)}
    return {id(p): (p, optimizer) for group in optimizer.param_groups for p in group["params"]}


def _create_flat_moments(ds_engine, step: float) -> None:
    """Adam's state on the ZeRO optimizer's flat fp32 partitions, which torch creates only at the
    first step, so the checkpoint's can be written into them; linked to each parameter's
    fragment (what DeepSpeed's own loader does after restoring a state dict)."""
    zero = ds_engine.optimizer
    if ds_engine.zero_optimization_stage() == 3:
        flats = zero.fp32_partitioned_groups_flat
    else:
        flats = zero.fp32_groups_flat_partition if isinstance(zero, BF16_Optimizer) else zero.single_partition_of_fp32_groups
    for flat in flats:
        moments = zero.optimizer.state[flat]
        for key in MOMENTS:
            moments.setdefault(key, torch.zeros_like(flat))
        moments["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device)
    if ds_engine.zero_optimization_stage() < 3:
        zero._lazy_init_hp_params_optimizer_state()


def _set_zero3(zero, param, weight: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """This rank's partition of a ZeRO-3 parameter: the model's copy (param.ds_tensor), the fp32
    master and the moments in the optimizer's flat group."""
    world, rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    part = param.ds_tensor.numel()  # ceil(numel / world): the last rank's is zero-padded
    group, offset, numel = zero.grad_position[zero.get_param_id(param)]

    def mine(value: torch.Tensor) -> torch.Tensor:
        flat = value.reshape(-1).float()
        padded = torch.cat([flat, flat.new_zeros(part * world - flat.numel())])
        return padded.narrow(0, part * rank, part)

    assert part == math.ceil(param.ds_numel / world)
    param.ds_tensor.copy_(mine(weight))
    flat = zero.fp32_partitioned_groups_flat[group]
    flat.narrow(0, offset, numel).copy_(mine(weight)[:numel])
    for key, value in moments.items():
        zero.optimizer.state[flat][key].narrow(0, offset, numel).copy_(mine(value)[:numel])
