"""Per-rank memory of a training run, predicted from its configuration before anything is built.

    plan = plan_from_config(run, vocab_size, ds_config)   # run = resolve(flags, world_size)
    estimate = estimate_memory(plan)             # one StageMemory per pipeline stage
    print(format_table(estimate)); estimate.per_rank_bytes

What is counted, per rank of each pipeline stage (all ranks of a stage hold the same amounts: TP
splits evenly, ZeRO partitions evenly over DP). P is the stage's parameters on one rank (model/describe.py: its TP
slice; the last stage of a pipeline holds the tied embedding again), w the parameter dtype's bytes:

- weights: w P; under ZeRO-3 w P / DP plus the parameters too small to partition
  (stage3_param_persistence_threshold) plus the gathered working set (below).
- fp32 master weights: 4 P / DP under ZeRO-1/2/3 (DeepSpeed keeps an fp32 copy of each rank's
  partition even when the weights are fp32) and under bf16/fp16; none under ZeRO-0 fp32.
- Adam states (exp_avg, exp_avg_sq): 8 P, over DP from ZeRO-1 on.
- gradients: w P held whole until reduced (ZeRO-0/1): present through the backward pass only when
  an earlier micro-batch made them (gradient accumulation, pipelines), otherwise they grow while the
  activations shrink and count at the optimizer step; ZeRO-2/3 reduce bucket by bucket during the
  backward pass into a w P / DP partition buffer (ZeRO-3 holds a gathered parameter's whole
  gradient until it is reduced); ZeRO-1/2 build the fp32 gradient partition (4 P / DP) at the step.
- communication buckets, from the DeepSpeed JSON (DeepSpeed's defaults otherwise): ZeRO-1/2/3's
  reduce bucket (reduce_bucket_size elements of the gradients' dtype, twice with overlap_comm under
  ZeRO-1/2), ZeRO-0's flattened gradients for the data-parallel all-reduce.
- ZeRO-3's gathered parameters: the largest module plus up to stage3_max_live_parameters
  (what stage3_prefetch_bucket_size and stage3_max_reuse_distance keep gathered), at most the stage.
- activations per micro-batch, from what autograd saves in our blocks (model/transformer.py), in
  units of s b h (sequence x micro-batch x hidden) elements of the parameter dtype:
      none       4 + 12/TP per block (LN inputs/outputs, QKV, attention output, FC1, GELU) for GPT-2;
                 a Llama-family block keeps Q, K, V (K and V per query group) and, with rotary
                 positions, the rotated Q and K, and SwiGLU's four f-wide tensors (gate, SiLU, up,
                 their product): 4 + ((a + 2g) k + (a + g) k + a k + 4 f) / (h TP) with g groups, k channels,
                 + (2e + 1) a s / h per block with attention dropout (the probabilities, their
                 mask and the dropped copy; flash attention saves no s x s matrix without it),
                 + 2 one-byte dropout masks with hidden dropout;
                 + with --qk-layernorm (a + g) k / (h TP) (the norms' row-major copies of Q and K), as
                 much again without rotary positions (their outputs, which SDPA keeps), a k / (h TP)
                 (SDPA's output, which the CPU's kernel keeps once Q and K are contiguous; measured)
                 and the norms' fp32 statistics;
      selective  recomputes the attention core: "none" without its s x s terms;
      full       1 per block (its input), plus one block's "none" activations while it is recomputed;
  with --sequence-parallel the replicated units (LN regions, dropout masks, LN statistics) are split
  over TP too, so "none" is (4 + 12)/TP per block: Korthikanti et al.'s reasoning (34 s b h / TP
  instead of 10 s b h + 24 s b h / TP in fp16, counting dropout masks and the s x s attention
  matrices this model does not keep without attention dropout). The LN outputs the TP layers gather
  are kept as shards and gathered again in the backward pass (tensor_parallel/layers.py).
  The first stage adds Embed LN's input (1 unit; its output is the first block's LN input) and the
  token ids, the last the final LayerNorm's input and output (2 units), and a
  pipeline's send/receive buffers hold one unit each way; all three over TP with --sequence-parallel.
- logits and cross entropy on the last stage: the fp32 softmax that cross entropy saves plus its
  transient (the shifted fp32 logits in forward, the gradient in backward): 8 s b V / TP bytes,
  and the w-byte logits themselves when they are not already fp32.
- offload (`offload_optimizer`, `offload_param` with device cpu/nvme): Adam states, fp32 masters and
  gradient partitions (and ZeRO-3's weight partition) move to host memory, reported apart.
- pipeline in flight: DeepSpeed's 1F1B keeps max(2, min(PP - stage, micro-batches)) micro-batches'
  activations on a stage, so the first stage holds PP of them, the last one (or two).

The peak is what persists (weights, masters, Adam states, partition buffers, buckets) plus the larger
of the backward pass (activations in flight + logits + the gradients live then) and the optimizer
step (whole gradients, the fp32 gradient partition, the all-reduce's flat copy). Not counted: the
framework's own allocations (CUDA context, NCCL/gloo buffers, allocator fragmentation): give
`--device-memory` what the run may use, a few GB below the device's size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_snm.units import human

from megatron_snm.model.config import RECOMPUTE_GRANULARITIES as MODEL_RECOMPUTE_GRANULARITIES
from megatron_snm.model.describe import PIPELINE_PARTITION, ModelDescription, WeightInfo, describe

RECOMPUTE_GRANULARITIES = ("none", *MODEL_RECOMPUTE_GRANULARITIES)  # "none": the model config's None
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py, deepspeed/runtime/engine.py).
DEEPSPEED_DEFAULTS = dict(
    reduce_bucket_size=int(5e8), allgather_bucket_size=int(5e8), overlap_comm=None, contiguous_gradients=True,
    stage3_prefetch_bucket_size=int(5e7), stage3_max_live_parameters=int(1e9),
    stage3_max_reuse_distance=int(1e9), stage3_param_persistence_threshold=int(1e5),
)
ZERO0_ALLREDUCE_BUCKET = int(5e8)  # engine.allreduce_gradients(bucket_size=MEMORY_OPT_ALLREDUCE_SIZE)


@dataclass(frozen=True)
class MemoryPlan:
    """Everything the estimate depends on (built from the run's flags by `plan_from_config`)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int
    padded_vocab_size: int
    embedding_norm: str = "layernorm"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    recompute_granularity: str = "none"
    sequence_parallel: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # The architecture (GPT-2's by default): key/value heads, channels per head, SwiGLU, rotary positions.
    num_query_groups: int | None = None  # default: num_attention_heads
    kv_channels: int | None = None  # default: hidden_size / num_attention_heads
    swiglu: bool = False
    rotary: bool = False
    qk_layernorm: bool = False
    zero: dict = field(default_factory=dict)  # the DeepSpeed JSON's zero_optimization section
    model: ModelDescription | None = None  # its weights (model/describe.py); plan_from_config fills it

    def zero_setting(self, name: str):
        value = self.zero.get(name)
        return DEEPSPEED_DEFAULTS[name] if value is None else value


@dataclass
class StageMemory:
    """One pipeline stage's bytes per rank, by component; `peak_bytes` is the predicted high-water mark."""

    stage: int
    parameters: int  # on one rank of this stage (its TP slice, before ZeRO partitioning)
    layers: int
    in_flight: int  # micro-batches whose activations the stage holds at once
    persistent: dict[str, int]
    backward_pass: dict[str, int]
    optimizer_step: dict[str, int]
    offloaded: dict[str, int] = field(default_factory=dict)  # in host memory (offload_optimizer / offload_param)

    @property
    def host_bytes(self) -> int:
        return sum(self.offloaded.values())

    @property
    def peak_bytes(self) -> int:
        return sum(self.persistent.values()) + max(sum(self.backward_pass.values()),
                                                   sum(self.optimizer_step.values()))


@dataclass
class MemoryEstimate:
    plan: MemoryPlan
    stages: list[StageMemory]

    @property
    def per_rank_bytes(self) -> int:
        """The largest over all ranks (over the pipeline stages)."""
        return max(stage.peak_bytes for stage in self.stages)

    @property
    def largest_stage(self) -> StageMemory:
        return max(self.stages, key=lambda stage: stage.peak_bytes)


# --- parameters (from the model's description, model/describe.py) ------------------------------
def stage_weights(plan: MemoryPlan, stage: int) -> list[WeightInfo]:
    """The weights one rank of `stage` holds (the last stage of a pipeline holds a tied table again)."""
    return plan.model.stage_weights(plan.pipeline_parallel, stage)


def blocks_per_stage(plan: MemoryPlan) -> list[int]:
    """Transformer blocks per pipeline stage, as DeepSpeed cuts them (pipeline/module.py)."""
    return [sum(plan.model.layer_kinds[i] == PIPELINE_PARTITION for i in plan.model.stage_layers(plan.pipeline_parallel, s))
            for s in range(plan.pipeline_parallel)]


def _local(plan: MemoryPlan, weights: list[WeightInfo]) -> list[int]:
    return [w.local_numel(plan.tensor_parallel) for w in weights]


def _small_parameters(plan: MemoryPlan, weights: list[WeightInfo], threshold: int) -> int:
    """Parameters of numel <= threshold (ZeRO-3 keeps them whole on every rank)."""
    return sum(n for n in _local(plan, weights) if n <= threshold)


def _largest_module(plan: MemoryPlan, weights: list[WeightInfo]) -> int:
    """The most parameters one module gathers at once under ZeRO-3 (an embedding, or an MLP linear)."""
    modules: dict[str, int] = {}
    for w, n in zip(weights, _local(plan, weights)):
        modules[w.module] = modules.get(w.module, 0) + n
    return max(modules.values(), default=0)


# --- activations -------------------------------------------------------------------------------
def activation_bytes_per_block(plan: MemoryPlan, granularity: str | None = None) -> int:
    """What autograd keeps of one block for one micro-batch (see the module docstring)."""
    granularity = granularity or plan.recompute_granularity
    s, b, h, a, tp = plan.seq_length, plan.micro_batch_size, plan.hidden_size, plan.num_attention_heads, \
        plan.tensor_parallel
    e = _DTYPE_BYTES[plan.precision]
    sbh = s * b * h
    replicated_split = tp if plan.sequence_parallel else 1
    if granularity == "full":
        return sbh * e // replicated_split
    # 4 replicated units (norm_1 in/out, norm_2 in/out). TP-split: the QKV output (q heads x head_dim plus
    # K and V of each query group; the cores keep it through views), the rotated Q and K with rotary
    # positions (new tensors), attention's output, and the MLP's: FC1 and GELU f/h each, or SwiGLU's
    # gate, SiLU, up and their product, 4 f/h.
    groups, kv = plan.num_query_groups or a, plan.kv_channels or h // a
    qkv = (a + 2 * groups) * kv / h
    rotated = (a + groups) * kv / h if plan.rotary else 0
    # With query groups, PyTorch's math kernel (CPU) keeps K and V repeated to every query head; flash
    # attention (GPU) does not, so there the estimate is high by this term.
    repeated = 2 * (a - groups) * kv / h
    mlp = (4 if plan.swiglu else 2) * plan.ffn_hidden_size / h
    qk_norm = ((a + groups) * kv / h * (1 if plan.rotary else 2) + a * kv / h) if plan.qk_layernorm else 0
    split = (qkv + rotated + repeated + a * kv / h + mlp + qk_norm) / tp
    units = 4 / replicated_split + split
    total = units * sbh * e
    if plan.hidden_dropout > 0:
        total += 2 * sbh / replicated_split  # one-byte masks of the two residual-branch dropouts
    if plan.attention_dropout > 0 and granularity == "none":
        total += (2 * e + 1) * b * a * s * s / tp
    # LayerNorm statistics (mean, rstd per row, fp32) and attention's log-sum-exp.
    total += 2 * 2 * s * b * 4 / replicated_split + b * a * s * 4 / tp
    if plan.qk_layernorm:  # mean and rstd per head and token (RMSNorm: rstd only; counted as LayerNorm)
        total += 2 * s * b * (a + groups) * 4 / tp
    return int(total)


def output_bytes(plan: MemoryPlan) -> int:
    """Logits and cross entropy on the last stage at their peak, the start of the backward pass
    (tensor_parallel/cross_entropy.py): the fp32 softmax it saved and the gradient made from it,
    with the w-byte copy of that gradient when the logits are not fp32. DeepSpeed's pipeline engine
    also keeps the stage's output, the logits themselves, until that micro-batch's backward pass."""
    tokens_vocab = plan.seq_length * plan.micro_batch_size * plan.padded_vocab_size // plan.tensor_parallel
    e = _DTYPE_BYTES[plan.precision]
    held_logits = e * tokens_vocab if plan.pipeline_parallel > 1 else 0
    return 8 * tokens_vocab + (e * tokens_vocab if e != 4 else 0) + held_logits


def in_flight_micro_batches(plan: MemoryPlan, stage: int) -> int:
    """DeepSpeed's TrainSchedule.num_pipe_buffers (1F1B); one without a pipeline."""
    if plan.pipeline_parallel == 1:
        return 1
    return max(2, min(plan.pipeline_parallel - stage, plan.gradient_accumulation_steps))


def stage_activation_bytes(plan: MemoryPlan, stage: int) -> dict[str, int]:
    """Activations a stage holds at its peak (all its in-flight micro-batches) and the logits."""
    s, b, h, e = plan.seq_length, plan.micro_batch_size, plan.hidden_size, _DTYPE_BYTES[plan.precision]
    sbh = s * b * h // (plan.tensor_parallel if plan.sequence_parallel else 1)  # a replicated unit
    blocks = blocks_per_stage(plan)[stage]
    per_micro = blocks * activation_bytes_per_block(plan)
    if plan.recompute_granularity == "full" and blocks:
        per_micro += activation_bytes_per_block(plan, "none")  # one block recomputed in the backward pass
    first, last = stage == 0, stage == plan.pipeline_parallel - 1
    if first:
        per_micro += (sbh * e if plan.embedding_norm == "layernorm" else 0) + s * b * 8  # Embed LN input; the ids
    if last:
        per_micro += 2 * sbh * e  # final LayerNorm input and output
    in_flight = in_flight_micro_batches(plan, stage)
    parts = {"activations": per_micro * in_flight}
    if plan.pipeline_parallel > 1:  # the pipeline engine's send/receive buffers, one s b h tensor each way
        parts["pipeline_buffers"] = 2 * in_flight * sbh * e
    if last:
        parts["logits_and_cross_entropy"] = output_bytes(plan)
    return parts


# --- the estimate ------------------------------------------------------------------------------
def estimate_stage(plan: MemoryPlan, stage: int) -> StageMemory:
    w = _DTYPE_BYTES[plan.precision]
    dp, zero, mixed = plan.data_parallel, plan.zero_stage, plan.precision != "fp32"
    weights = stage_weights(plan, stage)
    params = sum(_local(plan, weights))
    part = math.ceil(params / dp)
    persistent: dict[str, int] = {}
    backward = stage_activation_bytes(plan, stage)
    step: dict[str, int] = {}
    gradients_whole = w * params
    # ZeRO-0/1 keep whole gradients; they are already there when a backward pass starts if an
    # earlier micro-batch of the step made them (accumulation, or any pipeline), and each new
    # gradient is then a transient beside the one it is added to.
    # That transient meets the most activations at the first gradient of the backward pass: the
    # output layer's (the embedding table) on the last stage, a block's W_1/W_2 elsewhere.
    grads_before_backward = plan.gradient_accumulation_steps > 1 or plan.pipeline_parallel > 1
    first_gradient = _largest_module(plan, weights) if stage == plan.pipeline_parallel - 1 else \
        max(w.local_numel(plan.tensor_parallel) for w in weights if w.matmul and not w.vocabulary)
    accumulating = {"gradients": gradients_whole,
                    "gradient_being_accumulated": w * first_gradient} if grads_before_backward else {}

    if zero == 0:
        persistent["weights"] = w * params
        if mixed:  # DeepSpeed's FP16/BF16 optimizer: an fp32 master (partitioned under bf16) and fp32 gradients
            persistent["fp32_master_weights"] = 4 * (part if plan.precision == "bf16" else params)
            persistent["fp32_gradients"] = 4 * params
        persistent["optimizer_states"] = 8 * (part if plan.precision == "bf16" else params)
        backward.update(accumulating)
        step["gradients"] = gradients_whole
        if dp > 1:
            step["allreduce_flat_gradients"] = w * min(params, ZERO0_ALLREDUCE_BUCKET)
    elif zero in (1, 2):
        persistent["weights"] = w * params
        persistent["fp32_master_weights"] = 4 * part
        persistent["optimizer_states"] = 8 * part
        overlap = bool(plan.zero_setting("overlap_comm"))  # DeepSpeed's default: on for stage 3 only
        if plan.zero_setting("contiguous_gradients") or plan.pipeline_parallel > 1:
            buckets = (2 if overlap else 1) * int(plan.zero_setting("reduce_bucket_size"))
            backward["reduce_bucket"] = w * buckets  # in the gradient accumulation dtype, the weights' by default
        if zero == 1:
            backward.update(accumulating)
            step["gradients"] = gradients_whole
        else:
            persistent["gradient_partition"] = w * part
        step["fp32_gradient_partition"] = 4 * part
        step.setdefault("reduce_bucket", backward.get("reduce_bucket", 0))
    else:  # ZeRO-3
        threshold = int(plan.zero_setting("stage3_param_persistence_threshold"))
        small = _small_parameters(plan, weights, threshold)
        persistent["weights"] = w * (math.ceil((params - small) / dp) + small)
        # DeepSpeed (0.19) shares the partition as the fp32 master only when its device compares
        # equal to the optimizer's device name, a torch.device against a str: never, so it clones.
        persistent["fp32_master_weights"] = 4 * part
        persistent["optimizer_states"] = 8 * part
        persistent["gradient_partition"] = w * part
        if plan.zero_setting("contiguous_gradients"):
            persistent["reduce_bucket"] = w * int(plan.zero_setting("reduce_bucket_size"))
        live = int(plan.zero_setting("stage3_max_live_parameters"))
        gathered = min(params - small, _largest_module(plan, weights) + live)
        backward["gathered_parameters"] = w * gathered
        # A gathered parameter's gradient is whole until reduce-scattered; the largest is the embedding's.
        backward["unreduced_gradient"] = w * _largest_module(plan, weights)
        step["gathered_parameters"] = 0

    offloaded = {}
    if _offload_device(plan.zero.get("offload_optimizer")):  # the optimizer's fp32 side lives in host memory
        for name in ("optimizer_states", "fp32_master_weights"):
            if name in persistent:
                offloaded[name] = persistent.pop(name)
        if zero in (1, 2):
            # The fp32 gradient partition is a standing host buffer; the device keeps a w-byte copy
            # of its partition to receive the updated weights before the all-gather.
            offloaded["fp32_gradient_partition"] = step.pop("fp32_gradient_partition")
            persistent["weight_partition_buffer"] = w * part
        if zero == 3:
            offloaded["gradient_partition"] = persistent.pop("gradient_partition")
    if zero == 3 and _offload_device(plan.zero.get("offload_param")):
        offloaded["weights"] = persistent.pop("weights")
    return StageMemory(stage=stage, parameters=params, offloaded=offloaded, layers=blocks_per_stage(plan)[stage], in_flight=in_flight_micro_batches(plan, stage),
                       persistent=persistent, backward_pass=_drop_zeros(backward), optimizer_step=_drop_zeros(step))


def _offload_device(section: dict | None) -> bool:
    return bool(section) and section.get("device", "none") in ("cpu", "nvme")


def _drop_zeros(parts: dict[str, int]) -> dict[str, int]:
    return {name: int(value) for name, value in parts.items() if value}


def estimate_memory(plan: MemoryPlan) -> MemoryEstimate:
    if plan.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"--recompute-granularity must be one of {RECOMPUTE_GRANULARITIES}, "
                         f"got {plan.recompute_granularity!r}")
    return MemoryEstimate(plan, [estimate_stage(plan, s) for s in range(plan.pipeline_parallel)])


# --- from the run's configuration ------------------------------------------------------------
def plan_from_config(run, vocab_size: int, ds_config: dict) -> MemoryPlan:
    """The plan of a resolved RunConfig (config/resolve.py) and its DeepSpeed config (`run.deepspeed`
    with training/zero3.py's stage-3 defaults applied)."""
    model, parallel = run.model, run.parallel
    description = describe(run.model_config(vocab_size))
    precision = "bf16" if parallel.bf16 else "fp16" if parallel.fp16 else "fp32"
    return MemoryPlan(
        num_layers=model.num_layers, hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size, seq_length=model.seq_length,
        padded_vocab_size=description.vocab_rows,
        embedding_norm=model.embedding_norm, tensor_parallel=run.dims.tensor, pipeline_parallel=run.dims.pipeline,
        data_parallel=run.dims.data, zero_stage=parallel.zero_stage, precision=precision,
        micro_batch_size=run.batch.micro_batch_size, gradient_accumulation_steps=run.gradient_accumulation_steps,
        recompute_granularity=model.recompute_granularity or "none", sequence_parallel=parallel.sequence_parallel,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        num_query_groups=model.num_query_groups, kv_channels=model.kv_channels, swiglu=model.swiglu,
        rotary=model.position_embedding_type == "rope", qk_layernorm=model.qk_layernorm, zero=dict(ds_config.get("zero_optimization", {})), model=description,
    )


# --- reporting ---------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB' (decimal), '141GiB' (binary) or a plain number of bytes."""
    number = text.strip().upper().rstrip()
    unit = number.lstrip("0123456789.")
    value = number[: len(number) - len(unit)]
    if not value or unit.strip() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: give e.g. 80GB, 141GiB or a number of bytes")
    return int(float(value) * _UNITS[unit.strip()])


def format_table(estimate: MemoryEstimate) -> str:
    """Per stage and component; the backward pass and the optimizer step are alternatives (the
    larger counts), what persists is held through both."""
    plan = estimate.plan
    lines = [f"memory per rank: TP={plan.tensor_parallel} PP={plan.pipeline_parallel} DP={plan.data_parallel} "
             f"ZeRO-{plan.zero_stage} {plan.precision} micro-batch {plan.micro_batch_size} x seq {plan.seq_length} "
             f"x {plan.gradient_accumulation_steps} accumulation, recompute {plan.recompute_granularity}, "
             f"sequence parallel {'on' if plan.sequence_parallel else 'off'}"]
    for stage in estimate.stages:
        lines.append(f"stage {stage.stage}: {stage.layers} blocks, {stage.parameters / 1e6:.1f}M parameters per rank, "
                     f"{stage.in_flight} micro-batch(es) in flight")
        for title, parts in (("persistent", stage.persistent), ("backward pass", stage.backward_pass),
                             ("optimizer step", stage.optimizer_step)):
            lines.append(f"  {title:<15} {human(sum(parts.values())):>12}")
            lines += [f"    {name:<30} {human(value):>12}" for name, value in parts.items()]
        lines.append(f"  {'peak':<15} {human(stage.peak_bytes):>12}")
        if stage.offloaded:
            lines.append(f"  {'host (offload)':<15} {human(stage.host_bytes):>12}")
            lines += [f"    {name:<30} {human(value):>12}" for name, value in stage.offloaded.items()]
    return "\n".join(lines)


def one_line(estimate: MemoryEstimate) -> str:
    """The training start's summary: the largest stage's peak and its three biggest components."""
    stage = estimate.largest_stage
    parts = {**stage.persistent, **(stage.backward_pass if sum(stage.backward_pass.values()) >=
                                    sum(stage.optimizer_step.values()) else stage.optimizer_step)}
    top = sorted(parts.items(), key=lambda item: -item[1])[:3]
    return (f"estimated memory per rank: {human(estimate.per_rank_bytes)} (stage {stage.stage} of "
            f"{len(estimate.stages)}; " + ", ".join(f"{name} {human(value)}" for name, value in top) + ")")


def advice(estimate: MemoryEstimate) -> str:
    """What would shrink the largest component most, in the flags' words."""
    plan, stage = estimate.plan, estimate.largest_stage
    parts = {**stage.persistent, **stage.backward_pass}
    biggest = max(parts, key=parts.get)
    if biggest in ("activations", "logits_and_cross_entropy", "pipeline_buffers"):
        hints = ["a smaller --micro-batch-size"]
        if plan.recompute_granularity != "full":
            hints.append("--recompute-granularity full (or --checkpoint-activations)")
        hints.append("a larger --tensor-model-parallel-size")
    elif biggest in ("reduce_bucket", "gathered_parameters"):
        hints = ["smaller reduce_bucket_size / stage3_max_live_parameters in the DeepSpeed JSON"]
    else:
        hints = [f"--zero-stage {plan.zero_stage + 1}"] if plan.zero_stage < 3 and not (
            plan.zero_stage >= 1 and plan.pipeline_parallel > 1) else []
        hints += ["a larger --tensor-model-parallel-size or --pipeline-model-parallel-size", "more data-parallel ranks"
                  if plan.zero_stage else "--zero-stage 1 or more"]
    return f"the largest part is {biggest} ({human(parts[biggest])}); try " + ", ".join(hints)


class DoesNotFit(ValueError):
    """The estimate exceeds --device-memory; the message says by how much and what to change."""


def check_fits(estimate: MemoryEstimate, device_bytes: int) -> None:
    if estimate.per_rank_bytes > device_bytes:
        raise DoesNotFit(f"--device-memory {human(device_bytes)}: the run needs an estimated "
                         f"{human(estimate.per_rank_bytes)} per rank on pipeline stage {estimate.largest_stage.stage}; "
                         + advice(estimate))


def startup_estimate(run, vocab_size: int) -> str:
    """The one line a training run prints at its start; raises ConfigError (before any process
    group exists) when `--device-memory` is set and the estimate exceeds it. The stage-3 defaults
    the engine adds to `run.deepspeed` are applied here too."""
    from megatron_snm.config import ConfigError
    from megatron_snm.training.zero3 import apply_zero_defaults

    ds_config = apply_zero_defaults(run.deepspeed, run.model_config(vocab_size), run.dims.tensor)
    estimate = estimate_memory(plan_from_config(run, vocab_size, ds_config))
    if run.parallel.device_memory:
        try:
            check_fits(estimate, parse_bytes(run.parallel.device_memory))
        except ValueError as err:
            raise ConfigError(str(err) if isinstance(err, DoesNotFit) else f"--device-memory: {err}") from None
    return one_line(estimate)
