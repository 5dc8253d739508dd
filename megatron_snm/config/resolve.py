"""From the flags as given to the configuration a run uses, checked before any process group exists.

    run = resolve(parse_args(argv), world_size)     # raises ConfigError naming the flags at fault
    run.batch.train_iters, run.dims.data, run.deepspeed, run.model_config(vocab_size)

`resolve` is pure: it returns a new, frozen `RunConfig` (presets filled in, the DeepSpeed JSON merged,
--train-tokens turned into iterations, ...) and changes nothing it is given. The model's own
config is derived from the model flags by field name, so a new model flag needs no copying here.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from megatron_snm.config.errors import ConfigError
from megatron_snm.config.flags import (
    BatchArgs, CheckpointArgs, DataArgs, EvalArgs, Flags, LoggingArgs, ModelArgs, OptimizerArgs, ParallelArgs,
    SpikeArgs,
)
from megatron_snm.data.gpt_dataset import parse_split
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.presets import MODEL_PRESETS
from megatron_snm.parallel.dims import ParallelDims
from megatron_snm.training import deepspeed_config


@dataclass(frozen=True)
class RunConfig:
    """What a run uses: every flag group resolved, plus what follows from them."""
    model: ModelArgs
    parallel: ParallelArgs
    batch: BatchArgs
    optim: OptimizerArgs
    data: DataArgs
    eval: EvalArgs
    logging: LoggingArgs
    checkpoint: CheckpointArgs
    spike: SpikeArgs
    dims: ParallelDims
    gradient_accumulation_steps: int
    deepspeed: dict  # the DeepSpeed config handed to deepspeed.initialize

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.parallel.bf16 else torch.float16 if self.parallel.fp16 else torch.float32

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model's config: the model flags of the same names, the tokenizer's vocabulary, the
        TP size and the precision."""
        return _gpt_config(self.model, vocab_size, self.dims.tensor, self.params_dtype)

    def flags(self) -> Flags:
        return Flags(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Flags)})

    def as_dict(self) -> dict:
        """Every resolved flag, flat (what a checkpoint records as the run's arguments)."""
        return self.flags().as_dict()


def gpt_config_of(flags: Flags, vocab_size: int, tensor_parallel_size: int = 1) -> GPTConfig:
    """The model config of recorded flags (a checkpoint's): its shape and precision, for a TP size."""
    dtype = torch.bfloat16 if flags.parallel.bf16 else torch.float16 if flags.parallel.fp16 else torch.float32
    return _gpt_config(flags.model, vocab_size, tensor_parallel_size, dtype)


def _gpt_config(model: ModelArgs, vocab_size: int, tensor_parallel_size: int, params_dtype: torch.dtype) -> GPTConfig:
    values = dataclasses.asdict(model)
    shared = {f.name: values[f.name] for f in dataclasses.fields(GPTConfig) if f.name in values}
    return GPTConfig(**shared, vocab_size=vocab_size, tensor_parallel_size=tensor_parallel_size,
                     params_dtype=params_dtype)


def _model(model: ModelArgs) -> ModelArgs:
    if model.model_size is not None:
        preset = MODEL_PRESETS[model.model_size]
        model = dataclasses.replace(model, **{k: v for k, v in preset.items() if getattr(model, k) is None})
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(model, name) is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required (or give --model-size)")
    return model


def parse_iteration_list(spec: str | None) -> list[int]:
    """--inject-divergence-at ITER[,ITER...]"""
    try:
        return [int(item) for item in (spec or "").split(",") if item.strip()]
    except ValueError:
        raise ConfigError(f"--inject-divergence-at {spec!r}: expected ITER[,ITER...], e.g. 120,340") from None


def _non_negative(**flags: float) -> None:
    for name, value in flags.items():
        if not value >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _positive(**flags: int | None) -> None:
    for name, value in flags.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _numbers(optim: OptimizerArgs, spike: SpikeArgs, evaluation: EvalArgs, data: DataArgs) -> None:
    """Values no run can use: not finite, negative, or out of their range."""
    for name, value in dataclasses.asdict(optim).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if optim.lr < 0 or optim.weight_decay < 0 or optim.adam_eps <= 0:
        raise ConfigError(f"--lr ({optim.lr}) and --weight-decay ({optim.weight_decay}) must be >= 0, --adam-eps "
                          f"({optim.adam_eps}) > 0")
    for flag, beta in (("--adam-beta1", optim.adam_beta1), ("--adam-beta2", optim.adam_beta2)):
        if not 0 <= beta < 1:
            raise ConfigError(f"{flag} must be in [0, 1), got {beta}")
    if optim.clip_grad is not None and optim.clip_grad < 0:
        raise ConfigError(f"--clip-grad must be >= 0 (0: no clipping), got {optim.clip_grad}")
    if not math.isfinite(spike.spike_factor):
        raise ConfigError(f"--spike-factor must be a finite number, got {spike.spike_factor}")
    if evaluation.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0 (0: no evaluation), got {evaluation.eval_iters}")
    try:
        shares = parse_split(data.split)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if evaluation.eval_iters > 0 and shares[1] == 0:
        raise ConfigError(f"--split {data.split} gives the validation set no documents, so validation would never "
                          f"run: give it a share (e.g. 969,30,1) or set --eval-iters 0")


def resolve(flags: Flags, world_size: int) -> RunConfig:
    """Checks every rule that needs no process group and fills the derived values. Raises ConfigError."""
    model, parallel, batch, optim = _model(flags.model), flags.parallel, flags.batch, flags.optim
    _numbers(optim, flags.spike, flags.eval, flags.data)
    try:
        dims = ParallelDims.of_world(world_size, parallel.tensor_model_parallel_size,
                                     parallel.pipeline_model_parallel_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:  # the model's own shape rules; the vocabulary size (the tokenizer's) only sets padding
        _gpt_config(model, vocab_size=1, tensor_parallel_size=dims.tensor, params_dtype=torch.float32).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if dims.pipeline > model.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size ({dims.pipeline}) must not exceed --num-layers "
                          f"({model.num_layers}): every stage needs a block")
    _positive(micro_batch_size=batch.micro_batch_size)

    ds_json = deepspeed_config.read_json(parallel.deepspeed_config)
    parallel, batch, optim = deepspeed_config.merge_flags(ds_json, parallel.deepspeed_config, parallel, batch, optim,
                                                          dims.data)
    if parallel.fp16 and parallel.bf16:  # after the merge: either may come from the DeepSpeed JSON
        raise ConfigError("--fp16 and --bf16 are mutually exclusive"
                          + (f" (counting {parallel.deepspeed_config})" if parallel.deepspeed_config else ""))
    per_step = batch.micro_batch_size * dims.data
    if batch.global_batch_size is None:
        batch = dataclasses.replace(batch, global_batch_size=per_step)
    if batch.global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size ({batch.global_batch_size}) must be divisible by --micro-batch-size "
            f"({batch.micro_batch_size}) x data-parallel size ({dims.data} = world {world_size} / (TP "
            f"{dims.tensor} x PP {dims.pipeline}))")
    if parallel.zero_stage >= 2 and dims.pipeline > 1:
        raise ConfigError(
            f"ZeRO stage {parallel.zero_stage} (--zero-stage or the DeepSpeed JSON) cannot be combined with "
            f"--pipeline-model-parallel-size {dims.pipeline}: DeepSpeed's pipeline engine supports ZeRO stages "
            "0 and 1 only")

    if (batch.train_iters is None) == (batch.train_tokens is None):
        raise ConfigError("give exactly one of --train-iters and --train-tokens")
    if batch.train_tokens is not None:
        batch = dataclasses.replace(
            batch, train_iters=math.ceil(batch.train_tokens / (batch.global_batch_size * model.seq_length)))
    _positive(train_iters=batch.train_iters)
    if optim.lr_decay_iters is None:
        optim = dataclasses.replace(optim, lr_decay_iters=batch.train_iters)
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"--min-lr ({optim.min_lr}) must be in [0, --lr ({optim.lr})]")
    if optim.lr_warmup_iters < 0 or optim.lr_decay_iters < optim.lr_warmup_iters:
        raise ConfigError(f"--lr-decay-iters ({optim.lr_decay_iters}) must be >= --lr-warmup-iters "
                          f"({optim.lr_warmup_iters}) >= 0")
    _positive(log_interval=flags.logging.log_interval, eval_interval=flags.eval.eval_interval)
    if flags.checkpoint.save_interval is not None and (flags.checkpoint.save is None
                                                       or flags.checkpoint.save_interval < 1):
        raise ConfigError("--save-interval needs --save and must be >= 1")
    if flags.checkpoint.keep_last_n_checkpoints is not None and flags.checkpoint.keep_last_n_checkpoints < 1:
        raise ConfigError(f"--keep-last-n-checkpoints must be >= 1, got {flags.checkpoint.keep_last_n_checkpoints}")
    spike = flags.spike
    if spike.spike_factor != 0 and (spike.spike_factor <= 1 or spike.spike_window < 1):
        raise ConfigError(f"--spike-factor ({spike.spike_factor}) must be 0 (off) or > 1, with --spike-window >= 1")
    _non_negative(max_skipped_steps=spike.max_skipped_steps, max_spiky_steps=spike.max_spiky_steps,
                  max_rollbacks=spike.max_rollbacks, rollback_margin=spike.rollback_margin,
                  rollback_lr_iters=spike.rollback_lr_iters, spike_zscore=spike.spike_zscore,
                  grad_norm_spike_factor=spike.grad_norm_spike_factor)
    if not 0 < spike.rollback_lr_factor <= 1:
        raise ConfigError(f"--rollback-lr-factor must be in (0, 1], got {spike.rollback_lr_factor}")
    if spike.on_divergence == "rollback" and not (flags.checkpoint.save and flags.checkpoint.save_interval):
        raise ConfigError("--on-divergence rollback needs checkpoints to roll back to: give --save and --save-interval")
    if spike.on_divergence == "rollback" and not (spike.max_skipped_steps or spike.max_spiky_steps):
        raise ConfigError("--on-divergence rollback needs a divergence rule: --max-skipped-steps or --max-spiky-steps")
    for value in [*(spike.iterations_to_skip or []), *parse_iteration_list(spike.inject_divergence_at)]:
        if value < 1:
            raise ConfigError(f"--iterations-to-skip / --inject-divergence-at: iterations count from 1, got {value}")
    for item in spike.skip_samples or []:
        if not re.fullmatch(r"\d+:\d+", item) or int(item.split(":")[0]) >= int(item.split(":")[1]):
            raise ConfigError(f"--skip-samples {item!r}: expected START:END with START < END, e.g. 1024:2048")

    gas = batch.global_batch_size // per_step
    return RunConfig(model=model, parallel=parallel, batch=batch, optim=optim, data=flags.data, eval=flags.eval,
                     logging=flags.logging, checkpoint=flags.checkpoint, spike=spike, dims=dims,
                     gradient_accumulation_steps=gas,
                     deepspeed=deepspeed_config.build(ds_json, parallel, batch, optim, gas))
