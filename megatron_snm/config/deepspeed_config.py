"""The DeepSpeed JSON of a run: what `--deepspeed_config` says, merged with the flags.

The flags and the JSON may both set the ZeRO stage, precision, the fp16 loss scaler, clipping and
batch sizes. A value
set on both sides must agree (a ConfigError names the flag and the file); a value set on one side
only is taken from it; the rest gets our defaults. The optimizer and LR schedule always come
from the flags, so a JSON with its own is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math

from megatron_snm.config.errors import ConfigError
from megatron_snm.config.flags import BatchArgs, OptimizerArgs, ParallelArgs


def read_json(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--deepspeed_config {path}: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, got {type(ds).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the '{section}' section; the optimizer (AdamW) and the LR "
                              "schedule come from the flags (--lr, --adam-*, --lr-decay-style, ...)")
    return ds


def merge_flags(ds: dict, path: str | None, parallel: ParallelArgs, batch: BatchArgs, optim: OptimizerArgs,
                data_parallel_size: int) -> tuple[ParallelArgs, BatchArgs, OptimizerArgs]:
    """The three flag groups with what the JSON fills in (new objects; the arguments are unchanged)."""
    def take(flag: str, mine, json_value, default):
        if json_value is not None and mine is not None and json_value != mine:
            raise ConfigError(f"{flag} {mine} conflicts with {path}, which says {json_value}")
        return mine if mine is not None else json_value if json_value is not None else default

    def section(name: str) -> dict:
        value = ds.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: '{name}' must be a JSON object, got {json.dumps(value)}")
        return value

    bf16_section = section("bf16") if "bf16" in ds else section("bfloat16")
    fp16 = section("fp16")
    json_power = fp16.get("initial_scale_power")
    parallel = dataclasses.replace(
        parallel,
        zero_stage=take("--zero-stage", parallel.zero_stage, section("zero_optimization").get("stage"), 0),
        fp16=take("--fp16", parallel.fp16, fp16.get("enabled"), False),
        bf16=take("--bf16", parallel.bf16, bf16_section.get("enabled"), False),
        # fp16 dynamic loss scaling: Megatron's flags, DeepSpeed's keys, Megatron's defaults.
        initial_loss_scale=take("--initial-loss-scale", parallel.initial_loss_scale,
                                None if json_power is None else float(2 ** json_power), float(2 ** 32)),
        min_loss_scale=take("--min-loss-scale", parallel.min_loss_scale, fp16.get("min_loss_scale"), 1.0),
        loss_scale_window=take("--loss-scale-window", parallel.loss_scale_window, fp16.get("loss_scale_window"),
                               1000),
        hysteresis=take("--hysteresis", parallel.hysteresis, fp16.get("hysteresis"), 2),
    )
    optim = dataclasses.replace(optim, clip_grad=take("--clip-grad", optim.clip_grad, ds.get("gradient_clipping"), 1.0))
    batch = dataclasses.replace(batch, global_batch_size=take("--global-batch-size", batch.global_batch_size,
                                                              ds.get("train_batch_size"), None))
    json_micro = ds.get("train_micro_batch_size_per_gpu")
    if json_micro is not None and json_micro != batch.micro_batch_size:
        raise ConfigError(f"--micro-batch-size {batch.micro_batch_size} conflicts with {path}, which says {json_micro}")
    json_gas = ds.get("gradient_accumulation_steps")
    if json_gas is not None and batch.global_batch_size is not None and \
            json_gas * batch.micro_batch_size * data_parallel_size != batch.global_batch_size:
        raise ConfigError(f"{path}: gradient_accumulation_steps {json_gas} disagrees with --global-batch-size "
                          f"{batch.global_batch_size} / (--micro-batch-size {batch.micro_batch_size} x DP "
                          f"{data_parallel_size})")
    return parallel, batch, optim


def build(ds: dict, parallel: ParallelArgs, batch: BatchArgs, optim: OptimizerArgs,
          gradient_accumulation_steps: int) -> dict:
    """The run's DeepSpeed config: the JSON's own keys, with the flag-derived ones set."""
    ds = copy.deepcopy(ds)
    ds.update(
        train_batch_size=batch.global_batch_size,
        train_micro_batch_size_per_gpu=batch.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_clipping=optim.clip_grad,
    )
    ds.setdefault("steps_per_print", 2**31 - 1)  # we print Megatron's lines ourselves
    ds.setdefault("zero_optimization", {})["stage"] = parallel.zero_stage
    ds.setdefault("fp16", {})["enabled"] = bool(parallel.fp16)
    if parallel.fp16 and parallel.loss_scale is not None:
        ds["fp16"]["loss_scale"] = parallel.loss_scale
    if parallel.fp16:
        ds["fp16"].update(initial_scale_power=int(math.log2(parallel.initial_loss_scale)),
                          min_loss_scale=parallel.min_loss_scale, loss_scale_window=parallel.loss_scale_window,
                          hysteresis=parallel.hysteresis)
    ds.pop("bfloat16", None)
    ds.setdefault("bf16", {})["enabled"] = bool(parallel.bf16)
    if parallel.sequence_parallel:
        # DeepSpeed's pipeline engine would send each TP rank a 1/TP piece of the activation between
        # stages and gather the pieces on the receiving side, which assumes the TP ranks hold the
        # same activation; under sequence parallelism each holds its own shard, sent whole.
        pipeline = ds.setdefault("pipeline", {})
        for key in ("pipe_partitioned", "grad_partitioned"):
            if pipeline.get(key):
                raise ConfigError(f"--sequence-parallel conflicts with pipeline.{key}: true in the DeepSpeed JSON "
                                  "(each TP rank's activations are its own sequence shard); drop the key")
            pipeline[key] = False
    return ds
