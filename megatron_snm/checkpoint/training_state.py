"""Reads the optimizer's state of a checkpoint of any layout into the layout-free form, beside its
weights (read.py), so that training can resume under another layout (training/reshard.py).

    state = read_training_state("runs/tiny/checkpoints/iter_0000100")
    state.weights["layers.0.attention.qkv.weight"]             # whole fp32 master weight
    state.moments["exp_avg"]["layers.0.attention.qkv.weight"]  # Adam's first moment, whole
    state.step                                                 # Adam's step count

Where DeepSpeed keeps them, per model-parallel rank (one TP rank of one pipeline stage;
`layout` is what training/checkpointing.py records in each of its model files: the TP rank, and
every parameter's layout-free name and local shape):
    ZeRO 0     mp_rank_XX_model_states.pt: the optimizer's own state dict, keyed by position in its
               parameter groups (the record lists those groups' names); under bf16/fp16 inside
               DeepSpeed's wrapper, beside the fp32 master weights (`fp32_groups`)
    ZeRO 1, 2  [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt, one per data-parallel rank D (also
               bf16 without ZeRO, whose BF16_Optimizer shards as ZeRO 1 does): a
               flat fp32 partition per parameter group and its moments; `param_slice_mappings` says
               where each parameter's fragment lies, and the fragments of ranks 0, 1, ... follow
               each other
    ZeRO 3     the same files, each parameter partitioned on its own (ceil(numel / DP) elements
               on each rank, zero-padded), in the order of the model file's `param_shapes`
The fp32 master weights are the model's own weights in an fp32 run under ZeRO 0 (read.py's).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from megatron_snm.checkpoint.layout import join_tensor_parallel
from megatron_snm.checkpoint.read import load_file, read_checkpoint
from megatron_snm.training.checkpoint_errors import CheckpointError
from megatron_snm.training.checkpointing import LAYOUT_RECORD

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"  # the fp32 master weights, where the optimizer holds its own copy


@dataclass
class TrainingState:
    weights: dict[str, torch.Tensor]             # layout-free fp32 (master) weights
    moments: dict[str, dict[str, torch.Tensor]]  # "exp_avg" / "exp_avg_sq" -> layout-free tensors
    step: float                                  # Adam's step count (the same for every parameter)
    metadata: dict                               # megatron_snm.json
    engine_counters: dict                        # DeepSpeed's global_steps, global_samples, skipped_steps


def read_training_state(checkpoint_dir: str, moments: bool = True) -> TrainingState:
    """The weights and (with `moments`) Adam's state of the checkpoint in `checkpoint_dir` (an
    iter_N directory), whole. Raises CheckpointError for a checkpoint it cannot take apart."""
    ckpt = read_checkpoint(checkpoint_dir)
    if not moments:
        return TrainingState({n: t.float() for n, t in ckpt.weights.items()}, {}, 0.0, ckpt.metadata, {})
    parallel = ckpt.metadata["parallel"]
    prefix = "bf16_" if parallel.get("precision") == "bfloat16" else ""  # DeepSpeed's names for bf16 shards
    units = _model_parallel_units(checkpoint_dir, parallel["zero_stage"])
    keys = (MASTER, *MOMENTS)
    found = {key: [{} for _ in range(parallel["tensor_model_parallel_size"])] for key in keys}
    steps, counters = set(), {}
    for mp_rank, header_file in units.items():
        header = load_file(header_file)
        record = header.get(LAYOUT_RECORD)
        if record is None:
            raise CheckpointError(f"{header_file}: no {LAYOUT_RECORD!r} record (saved by a version that did not "
                                  "record it); resume this checkpoint with its own layout")
        counters = counters or {k: header.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")}
        shards = [os.path.join(checkpoint_dir, f"{prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt")
                  for d in range(parallel["data_parallel_size"])]
        # bf16 without ZeRO (DeepSpeed's BF16_Optimizer, e.g. under PP) shards the optimizer as ZeRO 1 does.
        if parallel["zero_stage"] == 0 and not os.path.isfile(shards[0]):
            local, step = _zero0_state(header, record, header_file)
        else:
            read = _zero3_state if parallel["zero_stage"] == 3 else _zero12_state
            local, step = read(header, record, [load_file(f)["optimizer_state_dict"] for f in shards])
        steps.add(step)
        for key, tensors in local.items():
            for name, tensor in tensors.items():  # a pipeline-tied table is on two stages: the first one's
                found[key][record["tensor_rank"]].setdefault(name, tensor)
    if len(steps) > 1:
        raise CheckpointError(f"{checkpoint_dir}: the model-parallel ranks' optimizers are at different steps {steps}")
    joined = {key: join_tensor_parallel(found[key], checkpoint_dir) for key in keys if found[key][0]}
    weights = joined.pop(MASTER, None) or {n: t.float() for n, t in ckpt.weights.items()}
    if set(joined) != set(MOMENTS):
        raise CheckpointError(f"{checkpoint_dir}: holds no Adam moments (saved before the first step?)")
    for key, tensors in (("master weights", weights), *joined.items()):
        wrong = sorted(n for n in ckpt.weights if n not in tensors or tensors[n].shape != ckpt.weights[n].shape)
        if wrong:
            raise CheckpointError(f"{checkpoint_dir}: the optimizer's {key} do not match the model's weights at {wrong[:4]}")
    return TrainingState(weights, joined, steps.pop(), ckpt.metadata, counters)


def _model_parallel_units(checkpoint_dir: str, zero_stage: int) -> dict[int, str]:
    """{model-parallel rank: the model file holding its record}."""
    pattern = r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt" if zero_stage == 3 else r"mp_rank_(\d+)_model_states\.pt"
    units = {int(m.group(1)): os.path.join(checkpoint_dir, m.group(0))
             for m in (re.fullmatch(pattern, f) for f in sorted(os.listdir(checkpoint_dir))) if m}
    if not units:
        raise CheckpointError(f"{checkpoint_dir}: no model files ({pattern})")
    return units


def _step_of(state: dict, where: str) -> float:
    if "step" not in state:
        raise CheckpointError(f"{where}: the optimizer state holds no step count")
    return float(state["step"])


def _zero0_state(header: dict, record: dict, where: str):
    optimizer = header.get("optimizer")
    if not isinstance(optimizer, dict) or record.get("optimizer_order") is None:
        raise CheckpointError(f"{where}: holds no optimizer state by position")
    # bf16 / fp16: DeepSpeed's wrapper holds the torch optimizer's state and the fp32 masters.
    masters = optimizer.get("fp32_groups")
    optimizer = optimizer.get("optimizer_state_dict", optimizer)
    local, step = {key: {} for key in (MASTER, *MOMENTS)}, 0.0
    for g, (group, names) in enumerate(zip(optimizer["param_groups"], record["optimizer_order"])):
        for position, (index, name) in enumerate(zip(group["params"], names)):
            if masters is not None:
                local[MASTER][name] = masters[g][position]
            state = optimizer["state"].get(index)
            if not state:  # not stepped yet
                continue
            step = _step_of(state, where)
            for key in MOMENTS:
                local[key][name] = state[key]
    return local, step


def _zero12_state(header: dict, record: dict, ranks: list[dict]):
    pieces = {key: {} for key in (MASTER, *MOMENTS)}
    step = 0.0
    for sd in ranks:  # data-parallel rank order: each parameter's fragments in sequence
        base = sd["base_optimizer_state"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            flats = dict(base["state"][base["param_groups"][group]["params"][0]])
            step = _step_of(flats, "ZeRO optimizer file")
            flats[MASTER] = sd["single_partition_of_fp32_groups"][group]
            for name, fragment in mapping.items():
                for key in pieces:
                    pieces[key].setdefault(name, []).append(flats[key].narrow(0, fragment.start, fragment.numel))
    return {key: {record["full_names"][name]: torch.cat(fragments).view(record["shapes"][name])
                  for name, fragments in by_name.items()} for key, by_name in pieces.items()}, step


def _zero3_state(header: dict, record: dict, ranks: list[dict]):
    names, world = record["full_names"], len(ranks)
    local = {key: {} for key in (MASTER, *MOMENTS)}
    step = 0.0
    for group, group_shapes in enumerate(header["param_shapes"]):
        flats = [dict(sd["optimizer_state_dict"]["state"][group], **{MASTER: sd["fp32_flat_groups"][group]})
                 for sd in ranks]
        step = _step_of(flats[0], "ZeRO-3 optimizer file")
        offset = 0
        for name, shape in group_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            for key in local:
                whole = torch.cat([flat[key].narrow(0, offset, part) for flat in flats])
                local[key][names[name]] = whole[:numel].view(shape)
            offset += part
    return local, step
