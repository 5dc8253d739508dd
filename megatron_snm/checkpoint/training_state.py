"""Reads the optimizer's state of a checkpoint of any layout into the layout-free form, beside its
weights (read.py), so that training can resume under another layout (reshard.py).

    state = read_training_state("runs/tiny/checkpoints/iter_0000100")
    state.weights["layers.0.attention.qkv.weight"]             # whole fp32 master weight
    state.moments["exp_avg"]["layers.0.attention.qkv.weight"]  # Adam's first moment, whole
    state.step                                                 # Adam's step count

Where DeepSpeed keeps them, per model-parallel rank (one TP rank of one pipeline stage;
`layout` is what save_load.py records in each of its model files: the TP rank, and
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

Nothing is joined until it is asked for: the files are memory-mapped, and `weights` and `moments`
are mappings that build a whole tensor from its fragments and TP slices on each lookup, so a rank
that takes its piece of one tensor at a time holds one whole tensor at a time, not the model's state.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from megatron_snm.checkpoint.layout import check_same_names, join_slices
from megatron_snm.checkpoint.metadata import model_description
from megatron_snm.checkpoint.read import checkpoint_dir as find_checkpoint
from megatron_snm.checkpoint.read import load_file, module_weights, read_checkpoint, read_metadata
from megatron_snm.model.describe import ModelDescription
from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.format import LAYOUT_RECORD

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"  # the fp32 master weights, where the optimizer holds its own copy

Thunk = Callable[[], torch.Tensor]  # builds one TP rank's piece of a tensor from memory-mapped fragments


class LayoutFree(Mapping):
    """{layout-free name: whole tensor}, each joined from its TP ranks' pieces on lookup (not kept)."""

    def __init__(self, model: ModelDescription, per_tp_rank: list[dict[str, Thunk]], where: str):
        try:
            check_same_names(per_tp_rank, where)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        unknown = sorted(set(per_tp_rank[0]) - set(model.weights))
        if unknown:
            raise CheckpointError(f"{where}: weights the model in its metadata does not have: {unknown[:4]}")
        self._model, self._ranks = model, per_tp_rank

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._model.split_dim(name) is None:  # replicated: only TP rank 0's is built
            return self._ranks[0][name]().float()
        return join_slices(self._model, name, [rank[name]() for rank in self._ranks]).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranks[0])

    def __len__(self) -> int:
        return len(self._ranks[0])


@dataclass
class TrainingState:
    weights: Mapping[str, torch.Tensor]                  # layout-free fp32 (master) weights
    moments: dict[str, Mapping[str, torch.Tensor]]       # "exp_avg" / "exp_avg_sq" -> layout-free tensors
    step: float                                          # Adam's step count (the same for every parameter)
    metadata: dict                                       # megatron_snm.json
    engine_counters: dict                                # DeepSpeed's global_steps, global_samples, skipped_steps


def read_training_state(checkpoint_dir: str, moments: bool = True) -> TrainingState:
    """The weights and (with `moments`) Adam's state of the checkpoint in `checkpoint_dir` (an
    iter_N directory), layout-free. Raises CheckpointError for a checkpoint it cannot take apart."""
    if not moments:  # the weights alone, as the converters read them (any checkpoint, weights-only ones too)
        ckpt = read_checkpoint(checkpoint_dir)
        return TrainingState({n: t.float() for n, t in ckpt.weights.items()}, {}, 0.0, ckpt.metadata, {})
    path = find_checkpoint(checkpoint_dir)
    metadata = read_metadata(path)
    parallel = metadata["parallel"]
    prefix = "bf16_" if parallel.get("precision") == "bfloat16" else ""  # DeepSpeed's names for bf16 shards
    keys = (MASTER, *MOMENTS)
    found: dict[str, list[dict[str, Thunk]]] = {key: [{} for _ in range(parallel["tensor_model_parallel_size"])]
                                                for key in keys}
    steps, counters = set(), {}
    for mp_rank, header_file in _model_parallel_units(path, parallel["zero_stage"]).items():
        header = load_file(header_file)
        record = header.get(LAYOUT_RECORD)
        if record is None:
            raise CheckpointError(f"{header_file}: no {LAYOUT_RECORD!r} record (saved by a version that did not "
                                  "record it); resume this checkpoint with its own layout")
        counters = counters or {k: header.get(k, 0) for k in ("global_steps", "global_samples", "skipped_steps")}
        shards = [os.path.join(path, f"{prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt")
                  for d in range(parallel["data_parallel_size"])]
        # bf16 without ZeRO (DeepSpeed's BF16_Optimizer, e.g. under PP) shards the optimizer as ZeRO 1 does.
        if parallel["zero_stage"] == 0 and not os.path.isfile(shards[0]):
            local, step = _zero0_state(header, record, header_file)
        else:
            read = _zero3_state if parallel["zero_stage"] == 3 else _zero12_state
            local, step = read(header, record, [load_file(f)["optimizer_state_dict"] for f in shards])
        steps.add(step)
        for key, pieces in local.items():
            for name, piece in pieces.items():  # a pipeline-tied table is on two stages: the first one's
                found[key][record["tensor_rank"]].setdefault(name, piece)
    if len(steps) > 1:
        raise CheckpointError(f"{path}: the model-parallel ranks' optimizers are at different steps {steps}")
    if not found[MASTER][0]:  # an fp32 run without ZeRO: the model's weights are the masters
        found[MASTER] = [{name: (lambda t=t: t) for name, t in module_weights(path, metadata, tp_rank).items()}
                         for tp_rank in range(parallel["tensor_model_parallel_size"])]
    model = model_description(metadata)
    weights = LayoutFree(model, found[MASTER], path)
    joined = {key: LayoutFree(model, found[key], path) for key in MOMENTS}
    for key, tensors in joined.items():
        if tensors.keys() != weights.keys():
            raise CheckpointError(f"{path}: the optimizer's {key} does not cover the weights: "
                                  f"{sorted(tensors.keys() ^ weights.keys())[:4] or 'none saved'}")
    return TrainingState(weights, joined, steps.pop(), metadata, counters)


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
                local[MASTER][name] = lambda t=masters[g][position]: t
            state = optimizer["state"].get(index)
            if not state:  # not stepped yet
                continue
            step = _step_of(state, where)
            for key in MOMENTS:
                local[key][name] = lambda t=state[key]: t
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
    return {key: {record["full_names"][name]: _joiner(fragments, record["shapes"][name])
                  for name, fragments in by_name.items()} for key, by_name in pieces.items()}, step


def _joiner(fragments: list[torch.Tensor], shape, numel: int | None = None) -> Thunk:
    """Joins a parameter's flat fragments (views into memory-mapped files), cut to `numel` (ZeRO-3's
    padding), into its shape, when called."""
    def join() -> torch.Tensor:
        flat = torch.cat(fragments) if len(fragments) > 1 else fragments[0]
        return flat[:numel if numel is not None else flat.numel()].view(shape)
    return join


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
                local[key][names[name]] = _joiner([flat[key].narrow(0, offset, part) for flat in flats], shape, numel)
            offset += part
    return local, step
