"""The flag schema: one dataclass per concern, each field its own flag with its help beside it.

    flags = parse_args(argv)            # argv -> Flags (nothing checked yet that needs the world)
    flags.model.num_layers              # --num-layers
    flags.as_dict()                     # {"num_layers": ..., ...}: Megatron's flat `args`, saved in checkpoints

A field's name is its flag (`micro_batch_size` <-> `--micro-batch-size`, unless `flags=` says
otherwise) and its `help` is the `--help` text, so the two cannot drift apart. Defaults of None
mean "decided by resolve()" (a preset, the DeepSpeed JSON, or another flag); see config/resolve.py.
Flag names are Megatron-LM's wherever Megatron-LM has the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from megatron_snm.model.config import EMBEDDING_NORMS, INIT_METHODS
from megatron_snm.model.presets import MODEL_PRESETS


def _opt(default, help: str, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass(frozen=True)
class ModelArgs:
    model_size: str | None = _opt(None, "a preset of the paper's sizes; explicit shape flags override it",
                                  choices=sorted(MODEL_PRESETS))
    num_layers: int | None = _opt(None, "number of transformer blocks", type=int)
    hidden_size: int | None = _opt(None, "hidden size d", type=int)
    num_attention_heads: int | None = _opt(None, "attention heads", type=int)
    ffn_hidden_size: int | None = _opt(None, "FFN inner size (default 4 x hidden)", type=int)
    seq_length: int | None = _opt(None, "tokens per sample (= max position embeddings)", type=int)
    init_method: str = _opt("normal", "'normal': N(0, --init-method-std); 'small': sigma = sqrt(2/(5d))",
                            choices=INIT_METHODS)
    init_method_std: float = _opt(0.02, "std of the 'normal' init", type=float)
    scaled_init: bool = _opt(True, "do NOT scale W_O and W_2 by 1/sqrt(2N) (the paper's 'small sub-layers')",
                             action="store_false", flags=("--no-scaled-init",))
    embedding_norm: str = _opt("layernorm", "the paper's 'large shortcut': layernorm (Embed LN), scaled "
                               "(Scaled Embed), none (vanilla), detach (Embed Detach)", choices=EMBEDDING_NORMS)
    embed_detach_alpha: float = _opt(0.1, "alpha of --embedding-norm detach", type=float)
    hidden_dropout: float = _opt(0.0, "dropout on the residual branches and embedding", type=float)
    attention_dropout: float = _opt(0.0, "dropout on the attention probabilities", type=float)
    layernorm_epsilon: float = _opt(1e-5, "LayerNorm epsilon", type=float)
    openai_gelu: bool = _opt(False, "GELU's tanh approximation, as GPT-2 (needed to continue an imported GPT-2)",
                             action="store_true")
    checkpoint_activations: bool = _opt(False, "recompute each block in the backward pass", action="store_true")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this x TP", type=int)
    seed: int = _opt(1234, "initialisation, data-order and dropout seed", type=int)


@dataclass(frozen=True)
class ParallelArgs:
    tensor_model_parallel_size: int = _opt(1, "TP size", type=int)
    pipeline_model_parallel_size: int = _opt(1, "PP size (DeepSpeed pipeline engine, 1F1B)", type=int)
    zero_stage: int | None = _opt(None, "DeepSpeed ZeRO stage 0-3 (default: the JSON's, else 0)", type=int,
                                  choices=(0, 1, 2, 3))
    fp16: bool | None = _opt(None, "fp16 mixed precision with dynamic loss scaling", action="store_true")
    bf16: bool | None = _opt(None, "bf16 mixed precision", action="store_true")
    loss_scale: float | None = _opt(None, "static fp16 loss scale (default: dynamic)", type=float)
    deepspeed: bool = _opt(False, "accepted for compatibility: DeepSpeed is always the engine", action="store_true")
    deepspeed_config: str | None = _opt(None, "DeepSpeed JSON; flags fill what it leaves out, conflicts are errors",
                                        flags=("--deepspeed_config", "--deepspeed-config"))
    local_rank: int | None = _opt(None, "set by the deepspeed launcher; the environment is authoritative",
                                  type=int, flags=("--local_rank", "--local-rank"))
    cpu_shm_comm: bool = _opt(False, "on CPU, let DeepSpeed JIT-build its shared-memory all-reduce (faster "
                              "collectives within a node; the first build takes a minute)", action="store_true")


@dataclass(frozen=True)
class BatchArgs:
    micro_batch_size: int = _opt(1, "samples per forward pass per data-parallel rank", type=int)
    global_batch_size: int | None = _opt(None, "samples per optimizer step over all ranks (default micro x DP); "
                                         "sets gradient accumulation", type=int)
    train_iters: int | None = _opt(None, "optimizer steps to train for", type=int)
    train_tokens: int | None = _opt(None, "tokens to train on (alternative to --train-iters)", type=int)


@dataclass(frozen=True)
class OptimizerArgs:
    lr: float = _opt(1e-4, "peak learning rate", type=float)
    min_lr: float = _opt(0.0, "learning rate at the end of the decay", type=float)
    lr_warmup_iters: int = _opt(0, "linear warm-up steps", type=int)
    lr_decay_iters: int | None = _opt(None, "steps over which to decay (default: --train-iters)", type=int)
    lr_decay_style: str = _opt("cosine", "decay shape after warm-up", choices=("cosine", "linear", "constant"))
    weight_decay: float = _opt(0.01, "AdamW weight decay (never on biases and norms)", type=float)
    no_weight_decay_embeddings: bool = _opt(False, "no weight decay on the embeddings either", action="store_true")
    adam_beta1: float = _opt(0.9, "AdamW beta1", type=float)
    adam_beta2: float = _opt(0.999, "AdamW beta2", type=float)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", type=float)
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this (0: off; default: the JSON's, "
                                   "else 1.0)", type=float)


@dataclass(frozen=True)
class DataArgs:
    data_path: list[str] | None = _opt(None, "PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend", nargs="+")
    split: str = _opt("969,30,1", "train,valid,test proportions of the documents")
    data_cache_path: str | None = _opt(None, "where to cache the dataset indices (default: beside the data)")
    tokenizer_type: str | None = _opt(None, "e.g. GPT2BPETokenizer, SentencePieceTokenizer")
    vocab_file: str | None = _opt(None, "tokenizer vocabulary file")
    merge_file: str | None = _opt(None, "BPE merges file")
    tokenizer_model: str | None = _opt(None, "SentencePiece model file")


@dataclass(frozen=True)
class EvalArgs:
    eval_interval: int = _opt(1000, "validate every this many steps", type=int)
    eval_iters: int = _opt(10, "global batches per validation / test evaluation (0: none)", type=int)


@dataclass(frozen=True)
class LoggingArgs:
    log_interval: int = _opt(100, "print the iteration line every this many steps", type=int)
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    log_stability_interval: int = _opt(0, "every this many steps record the stability monitor's per-layer "
                                       "figures (0: only on the step after a loss spike)", type=int)
    debug: bool = _opt(False, "print the traceback of an error, not only its one-line message (or set "
                       "MEGATRON_SNM_DEBUG=1)", action="store_true")


@dataclass(frozen=True)
class CheckpointArgs:
    save: str | None = _opt(None, "checkpoint directory to save to")
    load: str | None = _opt(None, "checkpoint directory to resume from (its `latest`)")
    save_interval: int | None = _opt(None, "save every this many steps (and at the end)", type=int)
    async_save: bool = _opt(False, "write checkpoints from a background thread after a copy in CPU memory (the "
                            "loop is blocked only for the copy; `latest` moves once every rank's files are written)",
                            action="store_true")
    keep_last_n_checkpoints: int | None = _opt(None, "delete older checkpoints, keeping this many newest (never "
                                               "the one `latest` names, nor the last good one a rollback may need)",
                                               type=int)
    load_iteration: int | None = _opt(None, "load the checkpoint of this iteration instead of the one `latest` "
                                      "names (e.g. the one before a damaged checkpoint)", type=int)


@dataclass(frozen=True)
class SpikeArgs:
    spike_factor: float = _opt(3.0, "a loss above this x the running mean of recent steps is a spike (0: off)",
                               type=float)
    spike_window: int = _opt(20, "how many recent steps the running mean covers", type=int)
    skip_spiky_steps: bool = _opt(False, "skip the update of a spiky step (non-finite steps are always skipped)",
                                  action="store_true")
    spike_zscore: float = _opt(0.0, "also a spike: a loss above the running mean + this x its standard deviation "
                               "over --spike-window steps (0: off; OLMo-core's rule, e.g. 6)", type=float)
    grad_norm_spike_factor: float = _opt(0.0, "count a gradient-norm spike when the norm exceeds this x the running "
                                         "mean of recent norms (0: off); counted and logged, never skipped", type=float)
    max_skipped_steps: int = _opt(10, "after this many skipped steps in a row the run has diverged (0: never)",
                                  type=int)
    max_spiky_steps: int = _opt(0, "after this many loss spikes in a row the run has diverged (0: never)", type=int)
    on_divergence: str = _opt("stop", "when the run diverges: 'stop' (save, exit status 3) or 'rollback' (reload "
                              "the last checkpoint, skip the data that led into the divergence, go on)",
                              choices=("stop", "rollback"))
    max_rollbacks: int = _opt(3, "with --on-divergence rollback: at most this many rollbacks, then stop", type=int)
    rollback_margin: int = _opt(10, "a rollback skips the iterations from the checkpoint to the divergence and "
                                "this many more", type=int)
    rollback_lr_factor: float = _opt(1.0, "after a rollback, multiply the learning rate by this ...", type=float)
    rollback_lr_iters: int = _opt(0, "... for this many iterations", type=int)
    iterations_to_skip: list[int] | None = _opt(None, "iterations whose global batches are read and dropped "
                                                "without training (Megatron-LM's flag)", type=int, nargs="+")
    skip_samples: list[str] | None = _opt(None, "START:END training-sample ranges to skip; every iteration whose "
                                          "global batch overlaps one is skipped", nargs="+")
    inject_divergence_at: str | None = _opt(None, "drills and tests: ITER[,ITER...] make the loss of those "
                                            "iterations non-finite, once each")


@dataclass(frozen=True)
class Flags:
    """Every flag of a run, by concern; the `--help` groups are these fields' titles."""
    model: ModelArgs = field(default_factory=ModelArgs, metadata=dict(title="model"))
    parallel: ParallelArgs = field(default_factory=ParallelArgs, metadata=dict(title="parallelism and precision"))
    batch: BatchArgs = field(default_factory=BatchArgs, metadata=dict(title="batch and length of training"))
    optim: OptimizerArgs = field(default_factory=OptimizerArgs, metadata=dict(title="optimizer and learning rate"))
    data: DataArgs = field(default_factory=DataArgs, metadata=dict(title="data"))
    eval: EvalArgs = field(default_factory=EvalArgs, metadata=dict(title="evaluation"))
    logging: LoggingArgs = field(default_factory=LoggingArgs, metadata=dict(title="logging"))
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs, metadata=dict(title="checkpointing"))
    spike: SpikeArgs = field(default_factory=SpikeArgs, metadata=dict(title="spike and divergence handling"))

    def as_dict(self) -> dict:
        """All flags in one flat, JSON-able dict (Megatron's `args`; what checkpoints record)."""
        return {name: value for group in dataclasses.fields(self)
                for name, value in dataclasses.asdict(getattr(self, group.name)).items()}


def flags_from_dict(values: dict) -> Flags:
    """Flags from a flat dict such as a checkpoint's recorded `args`: missing flags get their
    defaults, names this version does not know are ignored."""
    return Flags(**{group.name: group.default_factory(**{f.name: values[f.name]
                                                         for f in dataclasses.fields(group.default_factory)
                                                         if f.name in values})
                    for group in dataclasses.fields(Flags)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pre-train a GPT with tensor, pipeline and ZeRO data parallelism (DeepSpeed engine).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for group in dataclasses.fields(Flags):
        arguments = parser.add_argument_group(group.metadata["title"])
        for f in dataclasses.fields(group.default_factory):
            meta = dict(f.metadata)
            flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
            arguments.add_argument(*flags, dest=f.name, default=f.default, **meta)
    return parser


def parse_args(argv: list[str] | None = None) -> Flags:
    return flags_from_dict(vars(build_parser().parse_args(argv)))
