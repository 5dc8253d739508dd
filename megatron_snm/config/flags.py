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

from megatron_snm.model.config import (ATTENTION_BACKENDS, EMBEDDING_NORMS, INIT_METHODS, POSITION_EMBEDDING_TYPES,
                                       RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS)
from megatron_snm.model.presets import MODEL_PRESETS

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root")  # training/lr_schedule.py


def _opt(default, help: str, megatron_default=None, **argparse_kwargs):
    """A flag. `megatron_default`: Megatron-LM's default where ours differs (the help says so, and a
    run that keeps ours logs it at start-up: resolve.defaults_unlike_megatron)."""
    if megatron_default is not None:
        help += f" (Megatron-LM's default: {megatron_default})"
        argparse_kwargs["megatron_default"] = megatron_default
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass(frozen=True)
class ModelArgs:
    model_size: str | None = _opt(None, "a preset of the paper's sizes; explicit shape flags override it",
                                  choices=sorted(MODEL_PRESETS))
    num_layers: int | None = _opt(None, "number of transformer blocks", type=int)
    hidden_size: int | None = _opt(None, "hidden size d", type=int)
    num_attention_heads: int | None = _opt(None, "attention heads", type=int)
    ffn_hidden_size: int | None = _opt(None, "FFN inner size (default 4 x hidden; with --swiglu Megatron's "
                                       "int(8 h / 3 / 64) x 64)", type=int)
    seq_length: int | None = _opt(None, "tokens per sample", type=int)
    max_position_embeddings: int | None = _opt(None, "the longest sequence: rows of the learned position table, "
                                               "the longest generation with rotary positions (>= --seq-length; "
                                               "default --seq-length)", type=int)
    # The architecture (Megatron-LM's flags): GPT-2 by default; a Llama-family model is --position-embedding-type
    # rope --normalization RMSNorm --swiglu --group-query-attention --num-query-groups G --disable-bias-linear
    # --untie-embeddings-and-output-weights.
    position_embedding_type: str = _opt("learned_absolute", "positions: learned_absolute (GPT-2's table), rope "
                                        "(rotary, in attention), none", choices=POSITION_EMBEDDING_TYPES)
    use_rotary_position_embeddings: bool = _opt(False, "Megatron-DeepSpeed's name of --position-embedding-type rope",
                                                action="store_true")
    rotary_base: int = _opt(10000, "rotary positions: the base of the angles' geometric series (Llama 3: 500000)",
                            type=int)
    rotary_percent: float = _opt(1.0, "rotary positions: the share of each head's channels rotated", type=float)
    rotary_interleaved: bool = _opt(False, "rotary positions: rotate (even, odd) channel pairs (RoFormer) instead "
                                    "of (first half, second half) (Llama)", action="store_true")
    normalization: str = _opt("LayerNorm", "every norm of the model, Embed LN's too: LayerNorm or RMSNorm "
                              "(Megatron-DeepSpeed's layernorm / rmsnorm are accepted)",
                              choices=("LayerNorm", "RMSNorm", "layernorm", "rmsnorm"))
    apply_layernorm_1p: bool = _opt(False, "norm gains stored zero-centred, the norm multiplying by (1 + gain)",
                                    action="store_true")
    swiglu: bool = _opt(False, "the MLP is SwiGLU (silu-gated, three matrices) instead of GELU", action="store_true")
    group_query_attention: bool = _opt(False, "grouped-query attention with --num-query-groups key/value heads",
                                       action="store_true")
    num_query_groups: int = _opt(1, "with --group-query-attention: key/value heads (divides the attention heads "
                                 "and the TP size divides it)", type=int)
    num_key_value_heads: int | None = _opt(None, "Megatron-DeepSpeed's name: grouped-query attention with this "
                                           "many key/value heads (= --num-attention-heads: multi-head)", type=int)
    kv_channels: int | None = _opt(None, "channels per attention head (default --hidden-size / "
                                   "--num-attention-heads)", type=int)
    add_bias_linear: bool = _opt(True, "no biases in the linear layers (QKV, W_O, the MLP's)", action="store_false",
                                 flags=("--disable-bias-linear",))
    init_method: str = _opt("normal", "'normal': N(0, --init-method-std); 'small': sigma = sqrt(2/(5d))",
                            choices=INIT_METHODS)
    init_method_std: float = _opt(0.02, "std of the 'normal' init", type=float)
    scaled_init: bool = _opt(True, "do NOT scale W_O and W_2 by 1/sqrt(2N) (the paper's 'small sub-layers')",
                             action="store_false", flags=("--no-scaled-init",))
    embedding_init_method_std: float | None = _opt(None, "std of the normal init of the embedding's tables (token "
                                                   "and learned positions; the output layer's too where it is "
                                                   "tied); default: the other weights' sigma. Megatron's docstring "
                                                   "says it also exempts the embeddings from weight decay, which "
                                                   "its optimizer does not do: add --no-weight-decay-embeddings "
                                                   "for that", type=float)
    embedding_norm: str = _opt("layernorm", "the paper's 'large shortcut': layernorm (Embed LN), scaled "
                               "(Scaled Embed), none (vanilla), detach (Embed Detach)", choices=EMBEDDING_NORMS)
    embed_layernorm: bool = _opt(False, "BLOOM's Megatron-DeepSpeed name of --embedding-norm layernorm",
                                 action="store_true")
    embed_detach_alpha: float = _opt(0.1, "alpha of --embedding-norm detach", type=float)
    untie_embeddings_and_output_weights: bool = _opt(False, "give the output layer its own table instead of "
                                                     "the embedding's", action="store_true")
    hidden_dropout: float = _opt(0.0, "dropout on the residual branches and embedding", megatron_default=0.1,
                                 type=float)
    attention_dropout: float = _opt(0.0, "dropout on the attention probabilities", megatron_default=0.1, type=float)
    layernorm_epsilon: float = _opt(1e-5, "the norms' epsilon", type=float,
                                    flags=("--norm-epsilon", "--layernorm-epsilon"))
    openai_gelu: bool = _opt(False, "GELU's tanh approximation, as GPT-2 (needed to continue an imported GPT-2)",
                             action="store_true")
    recompute_activations: bool = _opt(False, "recompute attention's core (softmax(QK^T)V) in the backward pass: "
                                       "--recompute-granularity selective", action="store_true")
    recompute_granularity: str | None = _opt(None, "recompute in the backward pass: 'full' (whole blocks, see "
                                             "--recompute-method) or 'selective' (attention's core only)",
                                             choices=RECOMPUTE_GRANULARITIES)
    recompute_method: str | None = _opt(None, "with --recompute-granularity full: 'uniform' (chunks of "
                                        "--recompute-num-layers blocks, each recomputed as one) or 'block' (the "
                                        "first --recompute-num-layers blocks of each pipeline stage, one by one)",
                                        choices=RECOMPUTE_METHODS)
    recompute_num_layers: int | None = _opt(None, "blocks per chunk (uniform) or blocks recomputed (block); "
                                            "default 1 (uniform)", type=int)
    checkpoint_activations: bool = _opt(False, "old Megatron name: --recompute-granularity full "
                                        "--recompute-method uniform --recompute-num-layers 1", action="store_true")
    deepspeed_activation_checkpointing: bool = _opt(False, "Megatron-DeepSpeed's name, here the same as "
                                                    "--checkpoint-activations", action="store_true")
    qk_layernorm: bool = _opt(False, "apply --normalization's norm to each attention head's queries and keys "
                              "(over its channels, gains shared by the heads), before rotary positions",
                              action="store_true")
    z_loss_weight: float = _opt(0.0, "ours (PaLM's z-loss; OLMo-core's z_loss_multiplier): add W x the mean over "
                                "tokens of log^2 Z (Z the output softmax's normaliser) to the loss trained on; the "
                                "lm loss reported stays the cross entropy alone (0: off)", type=float)
    attention_backend: str = _opt("auto", "PyTorch SDPA kernel: auto (PyTorch chooses), flash, fused (memory-"
                                  "efficient), unfused / local (math)",
                                  choices=ATTENTION_BACKENDS)
    use_flash_attn: bool = _opt(False, "--attention-backend flash", action="store_true")
    make_vocab_size_divisible_by: int = _opt(128, "pad the vocabulary to a multiple of this x TP", type=int)
    seed: int = _opt(1234, "initialisation, data-order and dropout seed", type=int)


@dataclass(frozen=True)
class ParallelArgs:
    tensor_model_parallel_size: int = _opt(1, "TP size", type=int)
    pipeline_model_parallel_size: int = _opt(1, "PP size (DeepSpeed pipeline engine, 1F1B)", type=int)
    sequence_parallel: bool = _opt(False, "Megatron's sequence parallelism: with TP > 1 the LayerNorm, dropout and "
                                   "residual activations are split along the sequence over the TP ranks (an "
                                   "all-gather and a reduce-scatter around each TP layer instead of an all-reduce); "
                                   "needs --seq-length divisible by the TP size; off (with a note) at TP 1",
                                   action="store_true")
    zero_stage: int | None = _opt(None, "DeepSpeed ZeRO stage 0-3 (default: the JSON's, else 0)", type=int,
                                  choices=(0, 1, 2, 3))
    fp16: bool | None = _opt(None, "fp16 mixed precision with dynamic loss scaling", action="store_true")
    bf16: bool | None = _opt(None, "bf16 mixed precision", action="store_true")
    loss_scale: float | None = _opt(None, "static fp16 loss scale (default: dynamic)", type=float)
    initial_loss_scale: float | None = _opt(None, "fp16 dynamic loss scaling: the first scale, a power of 2 "
                                            "(default: the JSON's, else 2**32)", type=float)
    min_loss_scale: float | None = _opt(None, "fp16 dynamic loss scaling: the smallest scale (default: the "
                                        "JSON's, else 1)", type=float)
    loss_scale_window: int | None = _opt(None, "fp16 dynamic loss scaling: overflow-free steps before the scale "
                                         "doubles (default: the JSON's, else 1000)", type=int)
    hysteresis: int | None = _opt(None, "fp16 dynamic loss scaling: overflows tolerated before the scale halves "
                                  "(default: the JSON's, else 2)", type=int)
    use_distributed_optimizer: bool = _opt(False, "Megatron's sharded optimizer state: ZeRO stage 1 unless "
                                           "--zero-stage says otherwise", action="store_true")
    distributed_backend: str | None = _opt(None, "must name the device's backend (nccl on GPU, gloo on CPU)",
                                           choices=("nccl", "gloo", "ccl", "mpi"))
    no_pipeline_parallel: bool = _opt(False, "Megatron-DeepSpeed: no pipeline engine; needs "
                                      "--pipeline-model-parallel-size 1 (which never uses it)", action="store_true")
    deepspeed: bool = _opt(False, "accepted for compatibility: DeepSpeed is always the engine", action="store_true")
    deepspeed_config: str | None = _opt(None, "DeepSpeed JSON; flags fill what it leaves out, conflicts are errors",
                                        flags=("--deepspeed_config", "--deepspeed-config"))
    local_rank: int | None = _opt(None, "set by the deepspeed launcher; the environment is authoritative",
                                  type=int, flags=("--local_rank", "--local-rank"))
    device_memory: str | None = _opt(None, "memory of one device, e.g. 80GB or 141GiB: a run whose estimated "
                                     "per-rank memory exceeds it fails before any work starts "
                                     "(tools/estimate_memory.py shows the breakdown)")
    cpu_shm_comm: bool = _opt(False, "on CPU, let DeepSpeed JIT-build its shared-memory all-reduce (faster "
                              "collectives within a node; the first build takes a minute)", action="store_true")
    distributed_timeout_minutes: float = _opt(10.0, "how long a collective waits for the other ranks before the run "
                                              "ends with a message naming the rank that stopped answering (Megatron's "
                                              "default, 10; a fraction of a minute is accepted)", type=float)


@dataclass(frozen=True)
class BatchArgs:
    micro_batch_size: int = _opt(1, "samples per forward pass per data-parallel rank", type=int)
    global_batch_size: int | None = _opt(None, "samples per optimizer step over all ranks (default micro x DP); "
                                         "sets gradient accumulation", type=int)
    train_iters: int | None = _opt(None, "optimizer steps to train for", type=int)
    train_samples: int | None = _opt(None, "samples to train on (instead of --train-iters)", type=int)
    train_tokens: int | None = _opt(None, "tokens to train on: alone, the run's length; with --train-iters or "
                                    "--train-samples, training also stops once this many tokens are consumed "
                                    "(Megatron-DeepSpeed)", type=int)
    exit_interval: int | None = _opt(None, "save and exit (status 0) after an iteration divisible by this", type=int)
    exit_duration_in_mins: float | None = _opt(None, "save and exit (status 4: resume to continue) once this many "
                                               "minutes have passed since start", type=float)
    exit_signal_handler: bool = _opt(False, "on SIGTERM or SIGUSR1: finish the step, save, exit with status 4 "
                                     "(resume to continue)", action="store_true")
    num_workers: int = _opt(0, "data loader worker processes that read and collate the micro-batches ahead of "
                            "the step (0: in the training process)", megatron_default=2, type=int)
    manual_gc: bool = _opt(False, "turn Python's automatic garbage collector off and collect at fixed points "
                           "instead (every --manual-gc-interval steps, and before and after each evaluation), so "
                           "ranks do not pause at different moments", action="store_true")
    manual_gc_interval: int = _opt(0, "with --manual-gc: collect every this many steps (0: never between steps)",
                                   type=int)
    manual_gc_eval: bool = _opt(True, "with --manual-gc: do not collect before and after each evaluation",
                                action="store_false", flags=("--no-manual-gc-eval",))
    empty_unused_memory_level: int = _opt(0, "release the CUDA allocator's unused cached blocks (torch.cuda."
                                          "empty_cache) after each training step and each evaluation: 1 or 2 "
                                          "(Megatron's 2 also empties between backward and the optimizer step, "
                                          "inside DeepSpeed's step here; 0: never; CPU has no such cache)",
                                          type=int, choices=(0, 1, 2))


@dataclass(frozen=True)
class OptimizerArgs:
    lr: float = _opt(1e-4, "peak learning rate", type=float)
    min_lr: float = _opt(0.0, "learning rate at the end of the decay", type=float)
    lr_warmup_init: float = _opt(0.0, "learning rate the warm-up starts from", type=float)
    lr_warmup_iters: int = _opt(0, "linear warm-up steps", type=int)
    lr_warmup_samples: int = _opt(0, "linear warm-up over this many samples", type=int)
    lr_warmup_tokens: int | None = _opt(None, "linear warm-up over this many tokens", type=int)
    lr_warmup_fraction: float | None = _opt(None, "warm-up over this fraction of the decay (iterations, samples "
                                            "or tokens)", type=float)
    lr_decay_iters: int | None = _opt(None, "steps over which to decay (default: the run's length)", type=int)
    lr_decay_samples: int | None = _opt(None, "samples over which to decay", type=int)
    lr_decay_tokens: int | None = _opt(None, "tokens over which to decay (overrides the iteration/sample decay)",
                                       type=int)
    lr_decay_style: str = _opt("cosine", "decay shape after warm-up", megatron_default="linear",
                               choices=LR_DECAY_STYLES)
    weight_decay: float = _opt(0.01, "AdamW weight decay (never on biases and norms)", type=float)
    no_weight_decay_embeddings: bool = _opt(False, "no weight decay on the embeddings either", action="store_true")
    adam_beta1: float = _opt(0.9, "AdamW beta1", type=float)
    adam_beta2: float = _opt(0.999, "AdamW beta2", type=float)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", type=float)
    optimizer: str = _opt("adam", "adam: Adam with decoupled weight decay (AdamW), as Megatron's 'adam'",
                          choices=("adam", "sgd"))
    override_opt_param_scheduler: bool = _opt(False, "on resume, use this run's LR-schedule flags even where "
                                              "the checkpoint's differ", action="store_true",
                                              flags=("--override-opt_param-scheduler",))
    use_checkpoint_opt_param_scheduler: bool = _opt(False, "on resume, use the checkpoint's LR-schedule flags",
                                                    action="store_true",
                                                    flags=("--use-checkpoint-opt_param-scheduler",))
    clip_grad: float | None = _opt(None, "clip the global gradient norm to this (0: off; default: the JSON's, "
                                   "else 1.0)", type=float)
    decoupled_lr: float | None = _opt(None, "a learning rate of their own for the input embedding and the output "
                                      "layer (their own optimizer group, on the same warm-up and decay)", type=float)
    decoupled_min_lr: float | None = _opt(None, "with --decoupled-lr: where their decay ends (default --min-lr)",
                                          type=float)


@dataclass(frozen=True)
class DataArgs:
    data_path: list[str] | None = _opt(None, "PREFIX, or W1 PREFIX1 W2 PREFIX2 ... to blend", nargs="+")
    mock_data: bool = _opt(False, "train on Megatron's synthetic documents instead of --data-path (data/"
                           "mock_dataset.py; with --tokenizer-type NullTokenizer --vocab-size N)", action="store_true")
    split: str = _opt("969,30,1", "train,valid,test proportions of the documents")
    data_cache_path: str | None = _opt(None, "where to cache the dataset indices (default: beside the data)")
    tokenizer_type: str | None = _opt(None, "e.g. GPT2BPETokenizer, SentencePieceTokenizer (default: GPT2BPETokenizer "
                                      "when --vocab-file and --merge-file are given)")
    vocab_file: str | None = _opt(None, "tokenizer vocabulary file")
    merge_file: str | None = _opt(None, "BPE merges file")
    tokenizer_model: str | None = _opt(None, "SentencePiece model file")
    vocab_size: int | None = _opt(None, "NullTokenizer: the ids before the end of document (which is id N; the "
                                  "vocabulary is N + 1)", type=int)
    data_impl: str | None = _opt(None, "accepted, no effect: the data is always read as mmap .bin/.idx (lazy and "
                                 "cached are refused)", choices=("mmap", "infer", "lazy", "cached"))


@dataclass(frozen=True)
class EvalArgs:
    eval_interval: int = _opt(1000, "validate every this many steps", type=int)
    eval_iters: int = _opt(10, "global batches per validation / test evaluation (0: none)", megatron_default=100,
                           type=int)


@dataclass(frozen=True)
class LoggingArgs:
    log_interval: int = _opt(100, "print the iteration line every this many steps", type=int)
    tensorboard_dir: str | None = _opt(None, "write TensorBoard scalars here")
    tensorboard_log_interval: int = _opt(1, "write the per-step scalars every this many steps", type=int)
    log_learning_rate_to_tensorboard: bool = _opt(True, "the learning rate (on by default)", action="store_true")
    no_log_learning_rate_to_tensorboard: bool = _opt(False, "do not log the learning rate", action="store_true")
    log_loss_scale_to_tensorboard: bool = _opt(True, "do not log the fp16 loss scale", action="store_false",
                                               flags=("--no-log-loss-scale-to-tensorboard",))
    log_validation_ppl_to_tensorboard: bool = _opt(False, "validation and test perplexity too", action="store_true")
    log_timers_to_tensorboard: bool = _opt(False, "step, evaluation and save times", action="store_true")
    log_batch_size_to_tensorboard: bool = _opt(False, "the global batch size", action="store_true")
    log_memory_to_tensorboard: bool = _opt(False, "memory: CUDA allocator figures on GPU, process RSS on CPU",
                                           action="store_true")
    log_world_size_to_tensorboard: bool = _opt(False, "the number of ranks", action="store_true")
    log_optimizer_states_to_tensorboard: bool = _opt(False, "L2 norms of Adam's first and second moments",
                                                     action="store_true")
    log_throughput: bool = _opt(False, "Megatron's 'throughput per GPU (TFLOP/s/GPU)' in the log line and "
                                "TensorBoard", action="store_true")
    tensorboard_queue_size: int | None = _opt(None, "accepted, no effect: scalars are flushed by TensorBoard's "
                                              "writer itself", type=int)
    wandb_project: str | None = _opt(None, "log the TensorBoard scalars to this Weights & Biases project too "
                                     "(needs `pip install wandb`; WANDB_MODE=offline works)")
    wandb_exp_name: str | None = _opt(None, "the Weights & Biases run name")
    wandb_save_dir: str | None = _opt(None, "where Weights & Biases writes its files (default: "
                                      "--tensorboard-dir or ./wandb)")
    log_stability_interval: int = _opt(0, "every this many steps record the stability monitor's per-layer "
                                       "figures (0: only on the step after a loss spike)", type=int)
    profile: bool = _opt(False, "profile the steps after --profile-step-start up to --profile-step-end with "
                         "torch.profiler on the ranks of --profile-ranks; the trace goes to --tensorboard-dir "
                         "(TensorBoard's profiler plugin and chrome://tracing read it)", action="store_true")
    profile_step_start: int = _opt(10, "with --profile: profiling starts once this many steps are done", type=int)
    profile_step_end: int = _opt(12, "with --profile: profiling stops once this many steps are done", type=int)
    profile_ranks: list[int] | None = _opt(None, "with --profile: the global ranks to profile (default: rank 0)",
                                           type=int, nargs="+")
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
    overwrite_newer_checkpoints: bool = _opt(False, "let a run that starts from an older checkpoint than the newest "
                                             "in its --save (--load-iteration, or --finetune, into the same "
                                             "directory) overwrite the newer ones as it reaches their iterations "
                                             "(without it such a run is refused)", action="store_true")
    no_load_optim: bool = _opt(False, "on --load, do not load the optimizer state (Adam moments start at 0)",
                               action="store_true")
    no_load_rng: bool = _opt(False, "on --load, do not restore the random-number states", action="store_true")
    finetune: bool = _opt(False, "on --load, load the model weights only: iteration 0, fresh optimizer and RNG, "
                          "data from the start", action="store_true")


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
    spike_warning: str | None = _opt(
        None, "SIGNAL:FACTOR: when SIGNAL exceeds FACTOR x the mean of its last --spike-window observations "
        "(at least 5), log a warning and save a checkpoint at once (needs --save), so that a rollback finds "
        "one close to the spike. SIGNAL: grad_norm (every step), or from the stability monitor's steps "
        "(--log-stability-interval) update_rms_ratio, max_attention_logit, log_z, residual_std, "
        "ln_amplification (each the largest over the model's modules); tools/early_warning.py measures which "
        "warns best. Megatron-LM has no such flag; e.g. grad_norm:4")


def _no_effect(default, why: str, **argparse_kwargs):
    """A Megatron flag that means nothing here; resolve() logs `why` when it is given."""
    return field(default=default, metadata=dict(help=f"accepted, no effect: {why}", no_effect=why, **argparse_kwargs))


def _refused(default, instead: str, **argparse_kwargs):
    """A Megatron flag for a feature this system does not have; resolve() refuses it, saying `instead`."""
    return field(default=default, metadata=dict(help=f"refused: {instead}", refused=instead, **argparse_kwargs))


_FLAG = dict(action="store_true")


@dataclass(frozen=True)
class CompatArgs:
    """Megatron-LM / Megatron-DeepSpeed flags that have no meaning here, or name a feature we lack
    (docs/megatron_flags.md lists every flag by how it is handled)."""
    no_async_tensor_model_parallel_allreduce: bool = _no_effect(
        False, "tensor-parallel all-reduces are synchronous here", **_FLAG)
    no_masked_softmax_fusion: bool = _no_effect(False, "attention is PyTorch's SDPA (see --attention-backend)",
                                                **_FLAG)
    no_bias_gelu_fusion: bool = _no_effect(False, "bias + GeLU is not fused here", **_FLAG)
    no_bias_dropout_fusion: bool = _no_effect(False, "bias + dropout is not fused here", **_FLAG)
    no_gradient_accumulation_fusion: bool = _no_effect(False, "gradients accumulate through autograd here", **_FLAG)
    no_persist_layer_norm: bool = _no_effect(False, "LayerNorm is ours (csrc) or apex's, never the persistent "
                                             "kernel", **_FLAG)
    use_mcore_models: bool = _no_effect(False, "the model is megatron-snm's own", **_FLAG)
    transformer_impl: str | None = _no_effect(None, "the model is megatron-snm's own layers (no Transformer "
                                              "Engine)",
                                              choices=("local", "transformer_engine"))
    overlap_grad_reduce: bool = _no_effect(False, "DeepSpeed schedules the gradient reduction "
                                           "(zero_optimization.overlap_comm in the JSON)", **_FLAG)
    overlap_param_gather: bool = _no_effect(False, "DeepSpeed schedules the parameter gathers", **_FLAG)
    apply_query_key_layer_scaling: bool = _no_effect(False, "mathematically a no-op (Megatron's fp16 overflow "
                                                     "guard); attention is PyTorch's SDPA", **_FLAG)
    no_query_key_layer_scaling: bool = _no_effect(False, "query-key layer scaling is never applied here (Megatron-"
                                                  "DeepSpeed's flag to turn it off)", **_FLAG)
    timing_log_level: int | None = _no_effect(None, "the timers are always the same few (see "
                                              "--log-timers-to-tensorboard)", type=int)
    dataloader_type: str | None = _no_effect(None, "the sampler is always Megatron's 'single' (in order from "
                                             "the consumed samples); cyclic and external are refused",
                                             choices=("single", "cyclic", "external"))
    num_experts: int | None = _refused(None, "mixture-of-experts layers do not exist here; drop --num-experts",
                                       type=int)
    rampup_batch_size: list[str] | None = _refused(None, "the global batch size is fixed; drop "
                                                   "--rampup-batch-size and give --global-batch-size", nargs="+")
    step_batch_size_schedule: str | None = _refused(None, "the global batch size is fixed; drop "
                                                    "--step-batch-size-schedule and give --global-batch-size")
    eod_mask_loss: bool = _refused(False, "the loss covers every token; drop --eod-mask-loss", **_FLAG)
    reset_position_ids: bool = _refused(False, "positions run over the whole sample; drop --reset-position-ids",
                                        **_FLAG)
    reset_attention_mask: bool = _refused(False, "attention is causal over the whole sample; drop "
                                          "--reset-attention-mask", **_FLAG)
    init_method_xavier_uniform: bool = _refused(False, "use --init-method normal|small (the paper's)", **_FLAG)
    fp8_format: str | None = _refused(None, "fp8 needs Transformer Engine, which is not used here; use --bf16")
    fp8_amax_history_len: int | None = _refused(None, "fp8 needs Transformer Engine, which is not used here; drop "
                                                "the --fp8-* flags and use --bf16", type=int)
    fp8_amax_compute_algo: str | None = _refused(None, "fp8 needs Transformer Engine, which is not used here; drop "
                                                 "the --fp8-* flags and use --bf16")
    fp8_param_gather: bool = _refused(False, "fp8 needs Transformer Engine, which is not used here; drop the "
                                      "--fp8-* flags and use --bf16", **_FLAG)
    context_parallel_size: int = _refused(1, "context parallelism does not exist here; give "
                                          "--context-parallel-size 1 (or drop it) and split long sequences' "
                                          "activations with --tensor-model-parallel-size and --sequence-parallel",
                                          type=int)
    grad_reduce_in_bf16: bool = _no_effect(False, "DeepSpeed reduces the gradients in the dtype it accumulates them "
                                           "in (fp32 under --bf16); set communication_data_type in the DeepSpeed "
                                           "JSON to choose another", **_FLAG)
    cross_entropy_loss_fusion: bool = _no_effect(False, "the loss is one autograd function already (the vocabulary-"
                                                 "parallel cross entropy, tensor_parallel/cross_entropy.py)", **_FLAG)
    calculate_per_token_loss: bool = _no_effect(False, "the loss is the mean over the global batch's tokens either "
                                                "way: with no loss mask here every micro-batch holds the same number "
                                                "of tokens, so Megatron's per-token normalisation equals its "
                                                "per-micro-batch one", **_FLAG)
    tiktoken_pattern: str | None = _no_effect(None, "only Megatron's TikTokenizer reads it, which is not one of "
                                              "the tokenizers here", choices=("v1", "v2"))
    no_create_attention_mask_in_dataloader: bool = _no_effect(False, "no attention mask is ever built: attention is "
                                                              "causal inside the kernel", **_FLAG)
    no_mmap_bin_files: bool = _no_effect(False, "the .bin files are always memory-mapped (read lazily, pages shared "
                                         "between ranks)", **_FLAG)
    ckpt_format: str | None = _no_effect(None, "checkpoints are DeepSpeed's format; like torch_dist they load "
                                         "under any TP/PP/DP/ZeRO layout (training/reshard.py)")
    use_pytorch_profiler: bool = _no_effect(False, "--profile always uses PyTorch's profiler here", **_FLAG)
    use_cpu_initialization: bool = _no_effect(False, "weights are initialised from per-weight seeds on the "
                                              "device, identical to a CPU initialisation", **_FLAG)


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
    compat: CompatArgs = field(default_factory=CompatArgs,
                               metadata=dict(title="Megatron flags accepted with no effect, or refused"))

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
            meta = {k: v for k, v in f.metadata.items() if k not in ("no_effect", "refused", "megatron_default")}
            flags = meta.pop("flags", ("--" + f.name.replace("_", "-"),))
            arguments.add_argument(*flags, dest=f.name, default=f.default, **meta)
    return parser


def parse_args(argv: list[str] | None = None) -> Flags:
    return flags_from_dict(vars(build_parser().parse_args(argv)))
