"""The module a rank trains, built once, and ZeRO-3 that saves what it promises: the model built
partitioned, stage-3 settings sized to it.

    module, ds_config = build_module(run, gpt_config, loss_fn)   # the engine's one call
    ds_config = apply_zero_defaults(ds_config, gpt_config, tensor_parallel)   # what the JSON leaves open
    module = build_gpt_model(gpt_config, ds_config, mpu)

Built whole and partitioned afterwards, a model needs its full size on every rank first (52 GB of
fp32 at 13B). Under ZeRO-3 `build_gpt_model` constructs it inside DeepSpeed's `zero.Init`, which
partitions each module's parameters over the data-parallel ranks as soon as that module's
`__init__` returns. Our initialisation (model/init.py) fills each weight inside its module's
`__init__`, from the weight's own seeded generator on the CPU, so the values are those of ZeRO-0:
one weight is drawn whole, the rank keeps its partition, the rest is freed, weight after weight.
zero.Init is told not to change dtypes (our layers set them) and the init draws stay on the CPU.

DeepSpeed's stage-3 defaults are sized for no model in particular: stage3_max_live_parameters and
stage3_max_reuse_distance of 1e9 keep every parameter of a model below a billion gathered after
its first use, and reduce_bucket_size 5e8 allocates a 2 GB fp32 bucket. `apply_zero_defaults`
sizes them to one Transformer block instead (what one layer's forward needs, plus one block
prefetched); a key the DeepSpeed JSON sets wins.
"""
from __future__ import annotations

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import PIPELINE_PARTITION, describe
from megatron_snm.model.gpt import GPTModel


def block_parameter_count(gpt_config: GPTConfig, tensor_parallel: int) -> int:
    """The largest Transformer block's matrix elements on one TP rank (GPT-2's: QKV, W_O, W_1, W_2),
    from the model's description (model/describe.py)."""
    model = describe(gpt_config)
    blocks = [i for i, kind in enumerate(model.layer_kinds) if kind == PIPELINE_PARTITION]
    return max(sum(w.local_numel(tensor_parallel) for w in model.weights.values() if w.layer == block and w.matmul)
               for block in blocks)


def stage3_settings(gpt_config: GPTConfig, tensor_parallel: int) -> dict:
    """Stage-3 settings sized to the model: about one block live, one prefetched, nothing kept for reuse."""
    block = block_parameter_count(gpt_config, tensor_parallel)
    return dict(
        stage3_prefetch_bucket_size=block,
        stage3_max_live_parameters=2 * block,
        stage3_max_reuse_distance=block,
        # LayerNorm gains and biases (hidden_size elements) stay whole: gathering them costs more than they weigh.
        stage3_param_persistence_threshold=gpt_config.hidden_size,
        reduce_bucket_size=block,
    )


def apply_zero_defaults(ds_config: dict, gpt_config: GPTConfig, tensor_parallel: int) -> dict:
    """A copy of ds_config with, where the JSON sets none, the model-sized stage-3 settings (ZeRO-3),
    and with an offload section DeepSpeed told to keep our optimizer (GatedAdamW, training/optimizer.py:
    its update gate is what skips spiky steps) instead of demanding its own CPU Adam."""
    zero = ds_config.get("zero_optimization", {})
    ds_config = dict(ds_config)
    if zero.get("stage") == 3:
        ds_config["zero_optimization"] = {**stage3_settings(gpt_config, tensor_parallel), **zero}
    if zero.get("offload_optimizer") or zero.get("offload_param"):
        ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds_config


def build_gpt_model(gpt_config: GPTConfig, ds_config: dict, mpu) -> torch.nn.Module:
    """GPTModel for the PP = 1 engine; under ZeRO-3 partitioned from construction over the data-parallel
    ranks of `mpu` (the groups the engine hands DeepSpeed)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return GPTModel(gpt_config)
    # Imported here so that the settings above serve tools/estimate_memory.py without DeepSpeed's start-up.
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    with deepspeed.zero.Init(data_parallel_group=mpu.get_data_parallel_group(), mpu=mpu, config_dict_or_path=ds_config,
                             tensor_overrides=[DeepSpeedTensorOverride.device]):
        model = GPTModel(gpt_config)
    # The tied output layer multiplies by the embedding table outside the embedding's forward:
    # ZeRO-3 must gather it for the whole model's forward and backward.
    deepspeed.zero.register_external_parameter(model, model.embedding.word_embeddings.weight)
    return model


def build_module(run, gpt_config: GPTConfig, loss_fn) -> tuple[torch.nn.Module, dict]:
    """This rank's module and the DeepSpeed config sized to it (apply_zero_defaults): its pipeline
    stage (PP > 1, pipeline/module.py; `loss_fn(terms)` on the last stage), else GPTModel,
    partitioned as it is built under ZeRO-3. `run`: the resolved RunConfig."""
    from megatron_snm.pipeline.module import gpt_pipeline
    from megatron_snm.training.deepspeed_adapter import ParallelStateMPU

    ds_config = apply_zero_defaults(run.deepspeed, gpt_config, run.dims.tensor)
    if run.dims.pipeline > 1:
        return gpt_pipeline(gpt_config, loss_fn, run.dims), ds_config
    return build_gpt_model(gpt_config, ds_config, ParallelStateMPU), ds_config
