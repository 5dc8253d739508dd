"""From the flags as given to the configuration a run uses, checked before any process group exists.

    run = resolve(parse_args(argv), world_size)     # raises ConfigError naming the flags at fault
    run.batch.train_iters, run.dims.data, run.deepspeed, run.model_config(vocab_size)

`resolve` is pure: it returns a new, frozen `RunConfig` (presets filled in, the DeepSpeed JSON merged,
--train-samples / --train-tokens turned into iterations, every warm-up and decay flag turned into the
LR schedule's two lengths, Megatron's aliases turned into the flags they stand for, ...) and changes
nothing it is given. The model's own config is derived from the model flags by field name, so a new
model flag needs no copying here. Megatron flags that mean nothing here become `run.notes`, the
log lines the trainer prints at start; flags naming a feature we lack are refused.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass

import torch

from megatron_snm.config.errors import ConfigError
from megatron_snm.config.flags import (
    BatchArgs, CheckpointArgs, CompatArgs, DataArgs, EvalArgs, Flags, LoggingArgs, ModelArgs, OptimizerArgs,
    ParallelArgs, SpikeArgs,
)
from megatron_snm.data.gpt_dataset import parse_split
from megatron_snm.model.attention import SDPA_BACKENDS, check_attention_backend
from megatron_snm.model.config import GPTConfig, default_ffn_hidden_size
from megatron_snm.model.presets import MODEL_PRESETS
from megatron_snm.parallel.dims import ParallelDims
from megatron_snm.config import deepspeed_config
from megatron_snm.warning_signals import GRAD_NORM, SIGNALS


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
    compat: CompatArgs
    dims: ParallelDims
    gradient_accumulation_steps: int
    deepspeed: dict  # the DeepSpeed config handed to deepspeed.initialize
    lr_schedule: LRScheduleLengths
    notes: tuple[str, ...] = ()  # one log line per flag accepted with no effect
    divergence_iterations: tuple[int, ...] = ()  # --inject-divergence-at, parsed
    spike_warning: tuple[str, float] | None = None  # --spike-warning, parsed: (signal, factor)

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.parallel.bf16 else torch.float16 if self.parallel.fp16 else torch.float32

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model's config: the model flags of the same names, the tokenizer's vocabulary, the
        TP size and the precision."""
        return _gpt_config(self.model, vocab_size, self.dims.tensor, self.params_dtype,
                           sequence_parallel=self.parallel.sequence_parallel)

    def flags(self) -> Flags:
        return Flags(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Flags)})

    def as_dict(self) -> dict:
        """Every resolved flag, flat (what a checkpoint records as the run's arguments)."""
        return self.flags().as_dict()

    def effective(self) -> dict:
        """Every resolved flag plus what follows from them: the run's effective configuration."""
        return dict(self.as_dict(), world_size=self.dims.world_size, data_parallel_size=self.dims.data,
                    gradient_accumulation_steps=self.gradient_accumulation_steps,
                    lr_schedule_unit=self.lr_schedule.unit, lr_warmup_length=self.lr_schedule.warmup,
                    lr_decay_length=self.lr_schedule.decay,
                    deepspeed_fp16=self.deepspeed["fp16"], deepspeed_zero_stage=self.parallel.zero_stage)

    def arguments_text(self) -> str:
        """Megatron's start-of-run listing of the arguments, one per line."""
        lines = ["------------------------ arguments ------------------------"]
        lines += [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in sorted(self.effective().items())]
        lines.append("-------------------- end of arguments ---------------------")
        return "\n".join(lines)


@dataclass(frozen=True)
class LRScheduleLengths:
    """The LR schedule's warm-up and decay lengths, in samples or (Megatron-DeepSpeed's token flags) tokens."""
    unit: str  # "samples" | "tokens"
    warmup: int
    decay: int
    per_sample: int  # units per sample: 1, or --seq-length for tokens


def gpt_config_of(flags: Flags, vocab_size: int, tensor_parallel_size: int = 1) -> GPTConfig:
    """The model config of recorded flags (a checkpoint's): its shape and precision, for a TP size."""
    dtype = torch.bfloat16 if flags.parallel.bf16 else torch.float16 if flags.parallel.fp16 else torch.float32
    model = flags.model  # as a run resolved them, or as a converter wrote them (defaults left open)
    aliases = model.checkpoint_activations or model.deepspeed_activation_checkpointing
    model = dataclasses.replace(
        model, recompute_granularity=model.recompute_granularity or ("full" if aliases else None),
        recompute_method=model.recompute_method or "uniform", recompute_num_layers=model.recompute_num_layers or 1,
        max_position_embeddings=model.max_position_embeddings or model.seq_length)
    return _gpt_config(_architecture(model), vocab_size, tensor_parallel_size, dtype)


def _gpt_config(model: ModelArgs, vocab_size: int, tensor_parallel_size: int, params_dtype: torch.dtype,
                sequence_parallel: bool = False) -> GPTConfig:
    values = dataclasses.asdict(model)
    shared = {f.name: values[f.name] for f in dataclasses.fields(GPTConfig) if f.name in values}
    return GPTConfig(**shared, vocab_size=vocab_size, tensor_parallel_size=tensor_parallel_size,
                     sequence_parallel=sequence_parallel, params_dtype=params_dtype)


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


def parse_spike_warning(spec: str | None) -> tuple[str, float] | None:
    """--spike-warning SIGNAL:FACTOR"""
    if spec is None:
        return None
    signal, _, factor = spec.partition(":")
    if signal not in SIGNALS:
        raise ConfigError(f"--spike-warning {spec!r}: unknown signal {signal!r}, expected one of {', '.join(SIGNALS)}")
    try:
        value = float(factor)
    except ValueError:
        raise ConfigError(f"--spike-warning {spec!r}: expected SIGNAL:FACTOR, e.g. grad_norm:4") from None
    if not (math.isfinite(value) and value > 1):
        raise ConfigError(f"--spike-warning {spec!r}: the factor must be a finite number above 1")
    return signal, value


def _non_negative(**flags: float) -> None:
    for name, value in flags.items():
        if not value >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _compat(compat: CompatArgs) -> list[str]:
    """Refuses the flags of features we lack; returns a log line for each flag with no effect here."""
    if compat.dataloader_type not in (None, "single"):
        raise ConfigError(f"--dataloader-type {compat.dataloader_type} is not supported: samples are read in order "
                          "from the consumed-samples count ('single'); give --dataloader-type single or drop it")
    notes = []
    for f in dataclasses.fields(compat):
        value = getattr(compat, f.name)
        if value == f.default:
            continue
        if "refused" in f.metadata:
            raise ConfigError(f"{_flag(f.name)} is not supported: {f.metadata['refused']}")
        if "no_effect" in f.metadata:
            notes.append(f"{_flag(f.name)}{'' if value is True else ' ' + str(value)} has no effect: "
                         f"{f.metadata['no_effect']}")
    return notes


def defaults_unlike_megatron(flags: Flags) -> str | None:
    """One start-up line naming each flag left at a default that differs from Megatron-LM's (a
    Megatron script run unchanged gets ours there), or None. The table is each field's
    `megatron_default` in config/flags.py."""
    differ = []
    for group in dataclasses.fields(flags):
        values = getattr(flags, group.name)
        for f in dataclasses.fields(values):
            theirs = f.metadata.get("megatron_default")
            if theirs is not None and getattr(values, f.name) == f.default:
                differ.append(f"{_flag(f.name)} {f.default} (Megatron-LM: {theirs})")
    if not differ:
        return None
    return ("defaults that differ from Megatron-LM's, in effect here (give the flag to choose): " + ", ".join(differ))


def _recompute(model: ModelArgs) -> ModelArgs:
    """Megatron's recompute flags and their aliases -> granularity, method, number of layers."""
    aliases = [name for name in ("checkpoint_activations", "deepspeed_activation_checkpointing")
               if getattr(model, name)]
    granularity = model.recompute_granularity
    if aliases:
        if granularity not in (None, "full") or model.recompute_activations:
            raise ConfigError(f"{_flag(aliases[0])} (full recompute of every block) conflicts with "
                              "--recompute-activations / --recompute-granularity selective: give one")
        granularity = "full"
    if model.recompute_activations:
        if granularity not in (None, "selective"):
            raise ConfigError("--recompute-activations means --recompute-granularity selective, which conflicts "
                              f"with --recompute-granularity {granularity}")
        granularity = "selective"
    if granularity != "full" and (model.recompute_method is not None or model.recompute_num_layers is not None):
        raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
    return dataclasses.replace(model, recompute_granularity=granularity,
                               recompute_method=model.recompute_method or "uniform",
                               recompute_num_layers=model.recompute_num_layers or 1)


def _attention(model: ModelArgs, params_dtype: torch.dtype) -> tuple[ModelArgs, list[str]]:
    """The attention kernel. A kernel this device does not have at all (PyTorch has no memory-efficient
    kernel on CPU, so a GPU script's --attention-backend fused) falls back to auto with a note, since the
    kernel changes the speed, not the result; one the device has but that cannot take this model's head
    size, dtype or dropout is refused."""
    backend = model.attention_backend
    if model.use_flash_attn:
        if backend not in ("auto", "flash"):
            raise ConfigError(f"--use-flash-attn conflicts with --attention-backend {backend}")
        backend = "flash"
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        check_attention_backend(backend, device, params_dtype, model.kv_channels,
                                dropout=model.attention_dropout > 0)
    except ValueError as err:
        try:  # the plainest case: fp32, head size 64, no dropout
            check_attention_backend(backend, device, torch.float32, 64, dropout=False)
        except ValueError:
            note = (f"--attention-backend {backend} has no effect: {device.type} has no {SDPA_BACKENDS[backend].name}"
                    " kernel in PyTorch, so PyTorch chooses the kernel (--attention-backend auto); the attention "
                    "computed is the same")
            return dataclasses.replace(model, attention_backend="auto"), [note]
        raise ConfigError(str(err)) from None
    return dataclasses.replace(model, attention_backend=backend), []


def _run_length(batch: BatchArgs, seq_length: int) -> tuple[BatchArgs, int]:
    """--train-iters | --train-samples (| --train-tokens) -> iterations; also the schedule's length in
    samples (--train-tokens beside one of the others only stops training early, as in Megatron-DeepSpeed)."""
    if batch.train_iters is not None and batch.train_samples is not None:
        raise ConfigError("give one of --train-iters and --train-samples, not both")
    _positive(train_iters=batch.train_iters, train_samples=batch.train_samples, train_tokens=batch.train_tokens)
    gbs = batch.global_batch_size
    if batch.train_iters is not None:
        iters = batch.train_iters
    elif batch.train_samples is not None:
        iters = batch.train_samples // gbs
        if iters < 1:
            raise ConfigError(f"--train-samples ({batch.train_samples}) is less than one --global-batch-size ({gbs})")
    elif batch.train_tokens is not None:
        iters = math.ceil(batch.train_tokens / (gbs * seq_length))
    else:
        raise ConfigError("give one of --train-iters, --train-samples and --train-tokens")
    schedule_samples = batch.train_samples if batch.train_samples is not None else iters * gbs
    if batch.train_tokens is not None:
        iters = min(iters, math.ceil(batch.train_tokens / (gbs * seq_length)))
    return dataclasses.replace(batch, train_iters=iters), schedule_samples


def _lr_schedule(optim: OptimizerArgs, batch: BatchArgs, schedule_samples: int, seq_length: int
                 ) -> tuple[OptimizerArgs, LRScheduleLengths]:
    """Every warm-up and decay flag -> the schedule's two lengths (Megatron's and Megatron-DeepSpeed's rules)."""
    gbs = batch.global_batch_size
    if optim.lr_decay_iters is not None and optim.lr_decay_samples is not None:
        raise ConfigError("give one of --lr-decay-iters and --lr-decay-samples, not both")
    warmups = [name for name in ("lr_warmup_iters", "lr_warmup_samples") if getattr(optim, name)]
    warmups += ["lr_warmup_fraction"] if optim.lr_warmup_fraction is not None else []
    warmups += ["lr_warmup_tokens"] if optim.lr_warmup_tokens is not None else []
    if len(warmups) > 1:
        raise ConfigError(f"give one warm-up length, not {' and '.join(map(_flag, warmups))}")
    for name in ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_tokens", "lr_decay_iters", "lr_decay_samples",
                 "lr_decay_tokens"):
        value = getattr(optim, name)
        if value is not None and value < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
    if optim.lr_warmup_fraction is not None and not 0 <= optim.lr_warmup_fraction <= 1:
        raise ConfigError(f"--lr-warmup-fraction must be in [0, 1], got {optim.lr_warmup_fraction}")

    decay_samples = optim.lr_decay_samples if optim.lr_decay_samples is not None else \
        optim.lr_decay_iters * gbs if optim.lr_decay_iters is not None else schedule_samples
    tokens = optim.lr_decay_tokens is not None or optim.lr_warmup_tokens is not None
    per_sample = seq_length if tokens else 1
    decay = optim.lr_decay_tokens if optim.lr_decay_tokens is not None else decay_samples * per_sample
    if optim.lr_warmup_fraction is not None:
        warmup = round(optim.lr_warmup_fraction * decay)
    elif optim.lr_warmup_tokens is not None:
        warmup = optim.lr_warmup_tokens
    else:
        warmup = (optim.lr_warmup_samples or optim.lr_warmup_iters * gbs) * per_sample
    if decay < warmup:
        raise ConfigError(f"the LR decay ({decay} {'tokens' if tokens else 'samples'}: --lr-decay-*) must not end "
                          f"before the warm-up ({warmup}: --lr-warmup-*)")
    if optim.lr_decay_iters is None:  # shown as the flags Megatron would show
        optim = dataclasses.replace(optim, lr_decay_iters=decay_samples // gbs)
    return optim, LRScheduleLengths("tokens" if tokens else "samples", warmup, decay, per_sample)


def _model_defaults(model: ModelArgs) -> ModelArgs:
    """The model flags with the preset, the recompute aliases and the position table's size resolved."""
    model = _model(model)
    if model.embed_layernorm and model.embedding_norm != "layernorm":
        raise ConfigError(f"--embed-layernorm (BLOOM's name of --embedding-norm layernorm) conflicts with "
                          f"--embedding-norm {model.embedding_norm}")
    model = _recompute(model)
    if model.max_position_embeddings is None:
        model = dataclasses.replace(model, max_position_embeddings=model.seq_length)
    return _architecture(model)


def _architecture(model: ModelArgs) -> ModelArgs:
    """The architecture flags in Megatron-LM's spelling, with Megatron-DeepSpeed's aliases folded in and
    Megatron's derived defaults filled (--ffn-hidden-size, --kv-channels, the query groups)."""
    positions = model.position_embedding_type
    if model.use_rotary_position_embeddings:
        if positions not in ("learned_absolute", "rope"):
            raise ConfigError(f"--use-rotary-position-embeddings conflicts with --position-embedding-type {positions}")
        positions = "rope"
    groups = model.num_query_groups if model.group_query_attention else model.num_attention_heads
    if model.num_key_value_heads is not None:
        if model.group_query_attention and model.num_query_groups != model.num_key_value_heads:
            raise ConfigError(f"--num-key-value-heads ({model.num_key_value_heads}) conflicts with --num-query-groups "
                              f"({model.num_query_groups}): give one")
        groups = model.num_key_value_heads
    if groups < 1:
        raise ConfigError(f"--num-query-groups must be >= 1, got {groups}")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"--hidden-size ({model.hidden_size}) must be divisible by --num-attention-heads "
                          f"({model.num_attention_heads}), or give --kv-channels")
    return dataclasses.replace(
        model, position_embedding_type=positions, use_rotary_position_embeddings=False,
        normalization={"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}.get(model.normalization, model.normalization),
        group_query_attention=groups != model.num_attention_heads, num_query_groups=groups, num_key_value_heads=None,
        ffn_hidden_size=model.ffn_hidden_size or default_ffn_hidden_size(model.hidden_size, model.swiglu),
        kv_channels=model.kv_channels or model.hidden_size // model.num_attention_heads)


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
    notes = _compat(flags.compat)
    unlike_megatron = defaults_unlike_megatron(flags)
    if unlike_megatron:
        notes.append(unlike_megatron)
    model, parallel, batch, optim = _model_defaults(flags.model), flags.parallel, flags.batch, flags.optim
    _numbers(optim, flags.spike, flags.eval, flags.data)
    try:
        dims = ParallelDims.of_world(world_size, parallel.tensor_model_parallel_size,
                                     parallel.pipeline_model_parallel_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if parallel.sequence_parallel and dims.tensor == 1:  # Megatron-LM turns it off the same way
        parallel = dataclasses.replace(parallel, sequence_parallel=False)
        notes.append("--sequence-parallel has no effect: with --tensor-model-parallel-size 1 there is nothing to "
                     "split the sequence over (turned off, as Megatron-LM does)")
    try:  # the model's own shape rules; the vocabulary size (the tokenizer's) only sets padding
        _gpt_config(model, vocab_size=1, tensor_parallel_size=dims.tensor, params_dtype=torch.float32,
                    sequence_parallel=parallel.sequence_parallel).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if dims.pipeline > model.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size ({dims.pipeline}) must not exceed --num-layers "
                          f"({model.num_layers}): every stage needs a block")
    _positive(micro_batch_size=batch.micro_batch_size)
    if parallel.no_pipeline_parallel:
        if dims.pipeline > 1:
            raise ConfigError(f"--no-pipeline-parallel conflicts with --pipeline-model-parallel-size {dims.pipeline}")
        notes.append("--no-pipeline-parallel has no effect: with --pipeline-model-parallel-size 1 the model never "
                     "runs in DeepSpeed's pipeline engine")
    device_backend = "nccl" if torch.cuda.is_available() else "gloo"
    if parallel.distributed_backend is not None:
        if parallel.distributed_backend != device_backend:
            raise ConfigError(f"--distributed-backend {parallel.distributed_backend}: this machine's devices use "
                              f"{device_backend}; give --distributed-backend {device_backend} or drop the flag")
        notes.append(f"--distributed-backend {device_backend} has no effect: {device_backend} is what this device "
                     "uses anyway")
    if parallel.use_distributed_optimizer and parallel.zero_stage is None:
        parallel = dataclasses.replace(parallel, zero_stage=1)  # Megatron's sharded optimizer = ZeRO-1
    if parallel.initial_loss_scale is not None and (
            parallel.initial_loss_scale < 1 or not math.log2(parallel.initial_loss_scale).is_integer()):
        raise ConfigError(f"--initial-loss-scale must be a power of 2 (DeepSpeed's initial_scale_power), got "
                          f"{parallel.initial_loss_scale}")
    _positive(loss_scale_window=parallel.loss_scale_window)
    if not parallel.distributed_timeout_minutes > 0:
        raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {parallel.distributed_timeout_minutes}")
    for name in ("min_loss_scale", "hysteresis"):
        if getattr(parallel, name) is not None and getattr(parallel, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be > 0, got {getattr(parallel, name)}")

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
    params_dtype = torch.bfloat16 if parallel.bf16 else torch.float16 if parallel.fp16 else torch.float32
    model, attention_notes = _attention(model, params_dtype)
    notes += attention_notes

    batch, schedule_samples = _run_length(batch, model.seq_length)
    _positive(exit_interval=batch.exit_interval)
    if batch.exit_duration_in_mins is not None and batch.exit_duration_in_mins <= 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0, got {batch.exit_duration_in_mins}")
    if batch.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {batch.num_workers}")
    if batch.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be >= 0, got {batch.manual_gc_interval}")
    if batch.empty_unused_memory_level and not torch.cuda.is_available():
        notes.append(f"--empty-unused-memory-level {batch.empty_unused_memory_level} has no effect: it empties the "
                     "CUDA allocator's cache, and this machine has no CUDA device")
    if optim.optimizer != "adam":
        raise ConfigError(f"--optimizer {optim.optimizer} is not supported: the optimizer is Adam with decoupled "
                          "weight decay; use --optimizer adam (or drop the flag)")
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"--min-lr ({optim.min_lr}) must be in [0, --lr ({optim.lr})]")
    if not 0 <= optim.lr_warmup_init <= optim.lr:
        raise ConfigError(f"--lr-warmup-init ({optim.lr_warmup_init}) must be in [0, --lr ({optim.lr})]")
    optim, lr_schedule = _lr_schedule(optim, batch, schedule_samples, model.seq_length)
    if optim.decoupled_lr is None and optim.decoupled_min_lr is not None:
        raise ConfigError("--decoupled-min-lr needs --decoupled-lr (the learning rate of the input embedding and the "
                          "output layer)")
    if optim.decoupled_lr is not None and not 0 <= (optim.decoupled_min_lr or 0) <= optim.decoupled_lr:
        raise ConfigError(f"--decoupled-min-lr ({optim.decoupled_min_lr}) must be in [0, --decoupled-lr "
                          f"({optim.decoupled_lr})]")
    if optim.override_opt_param_scheduler and optim.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually "
                          "exclusive: take this run's schedule or the checkpoint's")

    logging_args = flags.logging
    _positive(log_interval=logging_args.log_interval, eval_interval=flags.eval.eval_interval,
              tensorboard_log_interval=logging_args.tensorboard_log_interval)
    logging_args = dataclasses.replace(logging_args, log_learning_rate_to_tensorboard=not
                                       logging_args.no_log_learning_rate_to_tensorboard)
    if logging_args.tensorboard_queue_size is not None:
        notes.append(f"--tensorboard-queue-size {logging_args.tensorboard_queue_size} has no effect: TensorBoard's "
                     "writer flushes on its own")
    if logging_args.profile:
        if not 0 <= logging_args.profile_step_start < logging_args.profile_step_end:
            raise ConfigError(f"--profile-step-start ({logging_args.profile_step_start}) must be >= 0 and less than "
                              f"--profile-step-end ({logging_args.profile_step_end})")
        if not logging_args.tensorboard_dir:
            raise ConfigError("--profile writes its trace into --tensorboard-dir: give --tensorboard-dir")
    if logging_args.wandb_project:
        if importlib.util.find_spec("wandb") is None:  # an optional dependency
            raise ConfigError("--wandb-project needs the wandb package: pip install wandb (or drop --wandb-project)")
    data = flags.data
    if data.tokenizer_type is None and data.vocab_file and data.merge_file:  # Megatron's scripts rely on this
        data = dataclasses.replace(data, tokenizer_type="GPT2BPETokenizer")
    if data.mock_data and data.data_path:
        raise ConfigError("--mock-data trains on synthetic documents, --data-path on a corpus: give one")
    if data.tokenizer_type == "NullTokenizer" and (data.vocab_size is None or data.vocab_size < 1):
        raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size N (ids 0..N-1, the end of document N)")
    if data.vocab_size is not None and data.tokenizer_type != "NullTokenizer":
        notes.append(f"--vocab-size {data.vocab_size} has no effect: the vocabulary is --tokenizer-type "
                     f"{data.tokenizer_type}'s (only NullTokenizer takes its size from the flag)")
    if data.data_impl in ("lazy", "cached"):
        raise ConfigError(f"--data-impl {data.data_impl} is not supported: the data is read as Megatron's mmap "
                          ".bin/.idx (what tools/preprocess_data.py writes); give --data-impl mmap or drop it")
    if data.data_impl is not None:
        notes.append(f"--data-impl {data.data_impl} has no effect: the data is always read as mmap .bin/.idx")
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
    spike_warning = parse_spike_warning(spike.spike_warning)
    if spike_warning and not flags.checkpoint.save:
        raise ConfigError("--spike-warning saves a checkpoint when it fires: give --save")
    if spike_warning and spike_warning[0] != GRAD_NORM and not logging_args.log_stability_interval:
        raise ConfigError(f"--spike-warning {spike.spike_warning}: {spike_warning[0]} is measured by the stability "
                          "monitor: give --log-stability-interval")
    divergences = tuple(parse_iteration_list(spike.inject_divergence_at))
    for value in [*(spike.iterations_to_skip or []), *divergences]:
        if value < 1:
            raise ConfigError(f"--iterations-to-skip / --inject-divergence-at: iterations count from 1, got {value}")
    for item in spike.skip_samples or []:
        if not re.fullmatch(r"\d+:\d+", item) or int(item.split(":")[0]) >= int(item.split(":")[1]):
            raise ConfigError(f"--skip-samples {item!r}: expected START:END with START < END, e.g. 1024:2048")

    gas = batch.global_batch_size // per_step
    return RunConfig(model=model, parallel=parallel, batch=batch, optim=optim, data=data, eval=flags.eval,
                     logging=logging_args, checkpoint=flags.checkpoint, spike=spike, compat=flags.compat, dims=dims,
                     gradient_accumulation_steps=gas,
                     deepspeed=deepspeed_config.build(ds_json, parallel, batch, optim, gas),
                     lr_schedule=lr_schedule, notes=tuple(notes), divergence_iterations=divergences,
                     spike_warning=spike_warning)
