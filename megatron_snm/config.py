"""The training run's configuration: one typed dataclass, parsed from Megatron-LM's flag names.

    cfg = parse_args()                 # argv -> Config (flags only, no checks needing the world)
    cfg.validate(world_size)           # every cross-flag rule; raises ConfigError naming the flags
    ds_config = cfg.build_deepspeed_config(world_size)  # the DeepSpeed JSON, given or generated
    gpt = cfg.gpt_config(vocab_size)   # the model's own config

Each field below is also its flag (`micro_batch_size` <-> `--micro-batch-size`), with the help
text beside it, so `--help` and the dataclass cannot drift apart. `validate` runs before any
process group exists: a wrong configuration fails on every rank before any work starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from megatron_snm.model.config import EMBEDDING_NORMS, INIT_METHODS, GPTConfig
from megatron_snm.model.presets import MODEL_PRESETS
from megatron_snm.parallel.state import ParallelSizes


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the flags."""


def _opt(default, help: str, group: str, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kwargs))


MODEL, PARALLEL, BATCH, OPTIM, DATA, EVAL, LOG, CKPT, SPIKE = (
    "model", "parallelism and precision", "batch and length of training", "optimizer and learning rate",
    "data", "evaluation", "logging", "checkpointing", "spike and divergence handling",
)

# Fields a model preset (`--model-size`) fills in when their flag is not given.
_PRESET_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")


@dataclass
class Config:
    # --- model -------------------------------------------------------------------------------
    model_size: str | None = _opt(None, "a preset of the paper's sizes; explicit shape flags override it",
                                  MODEL, choices=sorted(MODEL_PRESETS))
    num_layers: int | None = _opt(None, "number of transformer blocks", MODEL, type=int)
    hidden_size: int | None = _opt(None, "hidden size d", MODEL, type=int)
    num_attention_heads: int | None = _opt(None, "attention heads", MODEL, type=int)
    ffn_hidden_size: int | None = _opt(None, "FFN inner size (default 4 x hidden)", MODEL, type=int)
    seq_length: int | None = _opt(None, "tokens per sample (= max position embeddings)", MODEL, type=int)
    init_method: str = _opt("normal", "'normal': N(0, --init-method-std); 'small': sigma = sqrt(2/(5d))",
                            MODEL, choices=INIT_METHODS)
    init_method_std: float = _opt(0.02, "std of the 'normal' init", MODEL, type=float)
    no_scaled_init: bool = _opt(False, "do NOT scale W_O and W_2 by 1/sqrt(2N) (the paper's 'small sub-layers')",
                                MODEL, action="store_true")
    embedding_norm: str = _opt("layernorm", "the paper's 'large shortcut': layernorm (Embed LN), scaled "
                               "(Scaled Embed), none (vanilla), detach (Embed Detach)", MODEL, choices=EMBEDDING_NORMS)
    embed_detach_alpha: float = _opt(0.1, "alpha of --embedding-norm detach", MODEL, type=float)
    hidden_dropout: float = _opt(0.0, "dropout on the residual branches and embedding", MODEL, type=float)
    attention_dropout: float = _opt(0.0, "dropout on the attention probabilities", MODEL, type=float)
    layernorm_epsilon: float = _opt(1e-5, "LayerNorm epsilon", MODEL, type=float)
    checkpoint_activations: bool = _opt(False, "recompute each block in the backward pass", MODEL,
                                        action="store_true")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this x TP", MODEL, type=int)
    seed: int = _opt(1234, "initialisation, data-order and dropout seed", MODEL, type=int)

    # --- parallelism and precision -----------------------------------------------------------
    tensor_model_parallel_size: int = _opt(1, "TP size", PARALLEL, type=int)
    pipeline_model_parallel_size: int = _opt(1, "PP size (DeepSpeed pipeline engine, 1F1B)", PARALLEL, type=int)
    zero_stage: int | None = _opt(None, "DeepSpeed ZeRO stage 0-3 (default: the JSON's, else 0)", PARALLEL,
                                  type=int, choices=(0, 1, 2, 3))
    fp16: bool | None = _opt(None, "fp16 mixed precision with dynamic loss scaling", PARALLEL, action="store_true")
    bf16: bool | None = _opt(None, "bf16 mixed precision", PARALLEL, action="store_true")
    loss_scale: float | None = _opt(None, "static fp16 loss scale (default: dynamic)", PARALLEL, type=float)
    deepspeed: bool = _opt(False, "accepted for compatibility: DeepSpeed is always the engine", PARALLEL,
                           action="store_true")
    deepspeed_config: str | None = _opt(None, "DeepSpeed JSON; flags fill what it leaves out, conflicts are errors",
                                        PARALLEL, flags=("--deepspeed_config", "--deepspeed-config"))
    local_rank: int | None = _opt(None, "set by the deepspeed launcher; the environment is authoritative",
                                  PARALLEL, type=int, flags=("--local_rank", "--local-rank"))
    device_memory: str | None = _opt(None, "memory of one device, e.g. 80GB or 141GiB: a run whose estimated "
                                     "per-rank memory exceeds it fails before any work starts", PARALLEL)
    cpu_shm_comm: bool = _opt(False, "on CPU, let DeepSpeed JIT-build its shared-memory all-reduce "
                              "(faster collectives within a node; the first build takes a minute)",
                              PARALLEL, action="store_true")

    # --- batch and length of training --------------------------------------------------------
    micro_batch_size: int = _opt(1, "samples per forward pass per data-parallel rank", BATCH, type=int)
    global_batch_size: int | None = _opt(None, "samples per optimizer step over all ranks "
                                         "(default micro x DP); sets gradient accumulation", BATCH, type=int)
    train_iters: int | None = _opt(None, "optimizer steps to train for", BATCH, type=int)
    train_tokens: int | None = _opt(None, "tokens to train on (alternative to --train-iters)", BATCH, type=int)

    # --- optimizer and learning rate ---------------------------------------------------------
    lr: float = _opt(1e-4, "peak learning rate", OPTIM, type=float)
    min_lr: float = _opt(0.0, "learning rate at the end of the decay", OPTIM, type=float)
    lr_warmup_iters: int = _opt(0, "linear warm-up steps", OPTIM, type=int)
    lr_decay_iters: int | None = _opt(None, "steps over which to decay (default: --train-iters)", OPTIM, type=int)
    lr_decay_style: str = _opt("cosine", "decay shape after warm-up", OPTIM, choices=("cosine", "linear", "constant"))
    weight_decay: float = _opt(0.01, "AdamW weight decay (never on biases and norms)", OPTIM, type=float)
    no_weight_decay_embeddings: bool = _opt(False, "no weight decay on the embeddings either", OPTIM,
                                            action="store_true")
    adam_beta1: float = _opt(0.9, "AdamW beta1", OPTIM, type=float)
    adam_beta2: float = _opt(0.999, "AdamW beta2", OPTIM, type=float)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", OPTIM, type=float)
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this (0: off; default: the JSON's, "
                                   "else 1.0)", OPTIM, type=float)

    # --- data --------------------------------------------------------------------------------
    data_path: list[str] = _opt(None, "PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend", DATA, nargs="+")
    split: str = _opt("969,30,1", "train,valid,test proportions of the documents", DATA)
    data_cache_path: str | None = _opt(None, "where to cache the dataset indices (default: beside the data)", DATA)
    tokenizer_type: str | None = _opt(None, "e.g. GPT2BPETokenizer, SentencePieceTokenizer", DATA)
    vocab_file: str | None = _opt(None, "tokenizer vocabulary file", DATA)
    merge_file: str | None = _opt(None, "BPE merges file", DATA)
    tokenizer_model: str | None = _opt(None, "SentencePiece model file", DATA)

    # --- evaluation --------------------------------------------------------------------------
    eval_interval: int = _opt(1000, "validate every this many steps", EVAL, type=int)
    eval_iters: int = _opt(10, "global batches per validation / test evaluation (0: none)", EVAL, type=int)

    # --- logging -----------------------------------------------------------------------------
    log_interval: int = _opt(100, "print the iteration line every this many steps", LOG, type=int)
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here", LOG)
    log_stability_interval: int = _opt(0, "every this many steps record the stability monitor's per-layer "
                                       "figures (0: only on the step after a loss spike)", LOG, type=int)

    # --- checkpointing -----------------------------------------------------------------------
    save: str | None = _opt(None, "checkpoint directory to save to", CKPT)
    load: str | None = _opt(None, "checkpoint directory to resume from (its `latest`)", CKPT)
    save_interval: int | None = _opt(None, "save every this many steps (and at the end)", CKPT, type=int)

    # --- spike and divergence handling -------------------------------------------------------
    spike_factor: float = _opt(3.0, "a loss above this x the running mean of recent steps is a spike "
                               "(0: off)", SPIKE, type=float)
    spike_window: int = _opt(20, "how many recent steps the running mean covers", SPIKE, type=int)
    skip_spiky_steps: bool = _opt(False, "skip the update of a spiky step (non-finite steps are always skipped)",
                                  SPIKE, action="store_true")
    max_skipped_steps: int = _opt(10, "after this many skipped steps in a row, save and stop (0: never)",
                                  SPIKE, type=int)

    # ------------------------------------------------------------------------------------------
    def apply_preset(self) -> None:
        if self.model_size is None:
            return
        for name, value in MODEL_PRESETS[self.model_size].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            num_layers=self.num_layers, hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
            seq_length=self.seq_length, vocab_size=vocab_size, ffn_hidden_size=self.ffn_hidden_size,
            init_method=self.init_method, init_method_std=self.init_method_std, scaled_init=not self.no_scaled_init,
            embedding_norm=self.embedding_norm, embed_detach_alpha=self.embed_detach_alpha,
            hidden_dropout=self.hidden_dropout, attention_dropout=self.attention_dropout,
            layernorm_epsilon=self.layernorm_epsilon, checkpoint_activations=self.checkpoint_activations,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by, params_dtype=self.params_dtype,
            seed=self.seed,
        )

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def gradient_accumulation_steps(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def to_dict(self) -> dict:
        """Plain JSON-able values (saved in checkpoints; compared on resume)."""
        return dataclasses.asdict(self)

    # --- validation ---------------------------------------------------------------------------
    def validate(self, world_size: int) -> None:
        """Checks every rule that needs no process group; fills derived defaults. Raises ConfigError."""
        self.apply_preset()
        for name in _PRESET_FIELDS:
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} is required (or give --model-size)")
        try:
            dp = ParallelSizes(self.tensor_model_parallel_size, self.pipeline_model_parallel_size).validate(world_size)
            # The vocabulary size is the tokenizer's and only affects padding; 1 stands in here.
            self.gpt_config(vocab_size=1).validate(self.tensor_model_parallel_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.pipeline_model_parallel_size > self.num_layers:
            raise ConfigError(f"--pipeline-model-parallel-size ({self.pipeline_model_parallel_size}) must not exceed "
                              f"--num-layers ({self.num_layers}): every stage needs a block")
        if self.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")

        self._merge_deepspeed_json(world_size)
        if self.fp16 and self.bf16:  # after the merge: either may come from the DeepSpeed JSON
            raise ConfigError("--fp16 and --bf16 are mutually exclusive"
                              + (f" (counting {self.deepspeed_config})" if self.deepspeed_config else ""))
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * dp
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size ({self.global_batch_size}) must be divisible by --micro-batch-size "
                f"({self.micro_batch_size}) x data-parallel size ({dp} = world {world_size} / (TP "
                f"{self.tensor_model_parallel_size} x PP {self.pipeline_model_parallel_size}))"
            )
        if self.zero_stage >= 2 and self.pipeline_model_parallel_size > 1:
            raise ConfigError(
                f"ZeRO stage {self.zero_stage} (--zero-stage or the DeepSpeed JSON) cannot be combined with "
                f"--pipeline-model-parallel-size {self.pipeline_model_parallel_size}: DeepSpeed's pipeline engine "
                "supports ZeRO stages 0 and 1 only"
            )

        if (self.train_iters is None) == (self.train_tokens is None):
            raise ConfigError("give exactly one of --train-iters and --train-tokens")
        if self.train_tokens is not None:
            self.train_iters = math.ceil(self.train_tokens / (self.global_batch_size * self.seq_length))
        if self.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {self.train_iters}")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.train_iters
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min-lr ({self.min_lr}) must be in [0, --lr ({self.lr})]")
        if self.lr_warmup_iters < 0 or self.lr_decay_iters < self.lr_warmup_iters:
            raise ConfigError(f"--lr-decay-iters ({self.lr_decay_iters}) must be >= --lr-warmup-iters "
                              f"({self.lr_warmup_iters}) >= 0")
        for flag, value in (("--log-interval", self.log_interval), ("--eval-interval", self.eval_interval)):
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.save_interval is not None and (self.save is None or self.save_interval < 1):
            raise ConfigError("--save-interval needs --save and must be >= 1")
        if self.spike_factor != 0 and (self.spike_factor <= 1 or self.spike_window < 1):
            raise ConfigError(f"--spike-factor ({self.spike_factor}) must be 0 (off) or > 1, with --spike-window >= 1")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"--max-skipped-steps must be >= 0, got {self.max_skipped_steps}")

    def _merge_deepspeed_json(self, world_size: int) -> None:
        """Takes what the flags leave open from --deepspeed_config; a value set on both sides must agree."""
        self._ds_json = {}
        if self.deepspeed_config:
            try:
                with open(self.deepspeed_config) as f:
                    self._ds_json = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"--deepspeed_config {self.deepspeed_config}: {err}") from None
        ds, path = self._ds_json, self.deepspeed_config

        for section in ("optimizer", "scheduler"):
            if section in ds:
                raise ConfigError(f"{path}: remove the '{section}' section; the optimizer (AdamW) and the LR "
                                  "schedule come from the flags (--lr, --adam-*, --lr-decay-style, ...)")

        def take(flag: str, attr: str, json_value, default):
            mine = getattr(self, attr)
            if json_value is not None and mine is not None and json_value != mine:
                raise ConfigError(f"{flag} {mine} conflicts with {path}, which says {json_value}")
            setattr(self, attr, mine if mine is not None else json_value if json_value is not None else default)

        take("--zero-stage", "zero_stage", ds.get("zero_optimization", {}).get("stage"), 0)
        take("--fp16", "fp16", ds.get("fp16", {}).get("enabled"), False)
        take("--bf16", "bf16", ds.get("bf16", ds.get("bfloat16", {})).get("enabled"), False)
        take("--clip-grad", "clip_grad", ds.get("gradient_clipping"), 1.0)
        take("--global-batch-size", "global_batch_size", ds.get("train_batch_size"), None)
        json_micro = ds.get("train_micro_batch_size_per_gpu")
        if json_micro is not None and json_micro != self.micro_batch_size:
            raise ConfigError(f"--micro-batch-size {self.micro_batch_size} conflicts with {path}, which says {json_micro}")
        json_gas = ds.get("gradient_accumulation_steps")
        if json_gas is not None and self.global_batch_size is not None and \
                json_gas * self.micro_batch_size * self.data_parallel_size(world_size) != self.global_batch_size:
            raise ConfigError(f"{path}: gradient_accumulation_steps {json_gas} disagrees with --global-batch-size "
                              f"{self.global_batch_size} / (--micro-batch-size {self.micro_batch_size} x DP "
                              f"{self.data_parallel_size(world_size)})")

    def build_deepspeed_config(self, world_size: int) -> dict:
        """The DeepSpeed config of this run: the JSON's own keys, with the flag-derived ones set.
        Call after validate()."""
        ds = json.loads(json.dumps(self._ds_json))
        ds.update(
            train_batch_size=self.global_batch_size,
            train_micro_batch_size_per_gpu=self.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps(world_size),
            gradient_clipping=self.clip_grad,
            # Our optimizer is torch's AdamW (see training/optimizer.py), not one of DeepSpeed's own.
            zero_allow_untested_optimizer=True,
        )
        ds.setdefault("steps_per_print", 2**31 - 1)  # we print Megatron's lines ourselves
        ds.setdefault("zero_optimization", {})["stage"] = self.zero_stage
        ds.setdefault("fp16", {})["enabled"] = bool(self.fp16)
        if self.fp16 and self.loss_scale is not None:
            ds["fp16"]["loss_scale"] = self.loss_scale
        ds.pop("bfloat16", None)
        ds.setdefault("bf16", {})["enabled"] = bool(self.bf16)
        return ds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pre-train a GPT with tensor, pipeline and ZeRO data parallelism (DeepSpeed engine).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
        del meta["group"]
        group.add_argument(*flags, dest=f.name, default=f.default, **meta)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    return Config(**vars(build_parser().parse_args(argv)))
