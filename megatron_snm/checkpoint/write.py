"""Writes layout-free weights as a checkpoint of a chosen TP/PP layout, for `pretrain_gpt.py --load`.

    write_checkpoint(save_dir, weights, metadata, tensor_parallel=2, pipeline_parallel=1)

The result is a weights-only checkpoint: the model files DeepSpeed's engine reads (the same
names and contents as a ZeRO-0 save of that layout), `megatron_snm.json` with `weights_only: true`
and iteration 0, and no optimizer or RNG state. Loading it starts a run from these weights with a
fresh optimizer (save_load.load_checkpoint), under any layout and ZeRO stage
(another TP/PP or ZeRO 3 through reshard.py). Like every save it is written under a temporary name, then published by `latest`.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_snm.checkpoint.layout import WORD_EMBEDDINGS, resize_vocabulary, split_for_tensor_parallel
from megatron_snm.checkpoint.metadata import model_description
from megatron_snm.model.config import padded_vocab_size
from megatron_snm.atomic import publish_directory, temporary_path, write_atomically
from megatron_snm.checkpoint.format import LATEST, METADATA, tag_of
from megatron_snm.checkpoint.manifest import write_local_manifest


def _deepspeed_header(module, tp: int, pp: int) -> dict:
    """The entries DeepSpeed's load_checkpoint reads from mp_rank_*_model_states.pt."""
    import deepspeed

    return dict(module=module, buffer_names=[], optimizer=None, param_shapes=None, frozen_param_shapes=None,
                shared_params=None, frozen_param_fragments=None, lr_scheduler=None, data_sampler=None,
                random_ltd=None, skipped_steps=0, global_steps=0, global_samples=0, dp_world_size=1,
                mp_world_size=tp * pp, checkpoint_parallel_dimensions=dict(pp_degree=pp, tp_degree=tp),
                ds_version=deepspeed.__version__)


def write_checkpoint(save_dir: str, weights: dict[str, torch.Tensor], metadata: dict, tensor_parallel: int = 1,
                     pipeline_parallel: int = 1, vocab_size: int | None = None) -> str:
    """Writes `weights` (layout-free) split for TP x PP under `save_dir`; returns the iter directory.

    `metadata` is a megatron_snm.json (args, model_shape, ...); its parallel sizes and padded
    vocabulary are set here for the new layout. The embedding table is re-padded for the new TP
    size from `vocab_size` (the tokenizer's; default: the table's current rows).
    """
    args = metadata["args"]
    num_layers = metadata["model_shape"]["num_layers"]
    if pipeline_parallel > num_layers:
        raise ValueError(f"--pipeline-model-parallel-size {pipeline_parallel} exceeds the model's {num_layers} layers")
    rows = padded_vocab_size(vocab_size or weights[WORD_EMBEDDINGS].shape[0], tensor_parallel,
                             args.get("make_vocab_size_divisible_by", 128))
    model = model_description(metadata, rows)
    unknown, missing = sorted(set(weights) - set(model.weights)), sorted(set(model.weights) - set(weights))
    if unknown or missing:
        raise ValueError(f"the weights are not the model in the metadata: missing {missing[:4]}, unexpected {unknown[:4]}")
    weights = resize_vocabulary(model, weights, rows)

    tag = tag_of(0)
    final_dir = os.path.join(save_dir, tag)
    os.makedirs(save_dir, exist_ok=True)
    if os.path.lexists(final_dir):  # never replaced: it is not ours
        raise ValueError(f"{final_dir} already exists; write into a new --save directory")
    tmp_dir = temporary_path(final_dir)  # this call's own; the only directory ever removed here
    os.makedirs(tmp_dir)
    try:
        _write_files(tmp_dir, model, weights, metadata, args, rows, tensor_parallel, pipeline_parallel)
        publish_directory(tmp_dir, final_dir)
    finally:
        if os.path.lexists(tmp_dir):
            shutil.rmtree(tmp_dir)
    write_atomically(os.path.join(save_dir, LATEST), tag)
    return final_dir


def _write_files(tmp_dir, model, weights, metadata, args, rows, tensor_parallel, pipeline_parallel) -> None:
    for tp_rank in range(tensor_parallel):
        local = split_for_tensor_parallel(model, weights, tensor_parallel, tp_rank)
        if pipeline_parallel == 1:
            torch.save(_deepspeed_header(local, tensor_parallel, 1),
                       os.path.join(tmp_dir, f"mp_rank_{tp_rank:02d}_model_states.pt"))
            continue
        layers: dict[int, dict] = {}
        for name, tensor in local.items():
            layer, inner = model.pipeline_layer_of(name)
            layers.setdefault(layer, {})[inner] = tensor
        for layer, state in layers.items():
            torch.save(state, os.path.join(tmp_dir, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"))
    if pipeline_parallel > 1:  # the pipeline engine's per-rank files carry no module of their own
        for mp_rank in range(tensor_parallel * pipeline_parallel):
            torch.save(_deepspeed_header(None, tensor_parallel, pipeline_parallel),
                       os.path.join(tmp_dir, f"mp_rank_{mp_rank:02d}_model_states.pt"))

    args = dict(args, tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    meta = dict(metadata, args=args, iteration=0, consumed_train_samples=0, weights_only=True,
                parallel=dict(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
                              data_parallel_size=1, zero_stage=0),
                model_shape=dict(metadata["model_shape"], padded_vocab_size=rows))
    meta.pop("spike_policy", None)  # no training state: a run from it starts its own spike history
    with open(os.path.join(tmp_dir, METADATA), "w") as f:
        json.dump(meta, f, indent=1)
    write_local_manifest(tmp_dir)
