"""The training engine: our model in DeepSpeed's engine, and one training or evaluation step on it.

The engine computes and reports; it decides nothing. `train_step(batches, gate)` runs one global
batch (forward, backward, the optimizer step) and returns a `StepResult`; the trainer decides from
it what the step was (spike, skip, stop). The only thing the engine is told is the step's
`UpdateGate`, the plain rule the optimizer applies to the step's loss and gradient norm before it
updates (DeepSpeed measures the norm inside its own step, so the rule must be applied there).

- PP = 1: `GPTModel` in DeepSpeed's engine (ZeRO 0-3); we run the micro-batches ourselves.
- PP > 1: the model's pipeline stages (pipeline/module.py) in DeepSpeed's pipeline engine (1F1B,
  ZeRO 0-1), which runs the micro-batches itself (`train_batch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_snm.config import RunConfig
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import LossTerms, gpt_loss
from megatron_snm.parallel import rng, state
from megatron_snm.tensor_parallel.utils import is_tensor_parallel
from megatron_snm.training import deepspeed_adapter
from megatron_snm.training.fault_injection import FaultInjection
from megatron_snm.training.optimizer import GatedAdamW, param_groups
from megatron_snm.training.spikes import UpdateGate
from megatron_snm.training.zero3 import build_module


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's mean loss, identical on every rank
    grad_norm: float | None  # the global gradient norm before clipping (None: not measured)
    finite: bool  # loss and gradient norm finite (False also when DeepSpeed skipped a non-finite step)
    applied: bool  # the optimizer's update happened
    z_loss: float | None = None  # the global batch's mean z-loss (--z-loss-weight; None without it), apart from `loss`


def data_parallel_means(values: torch.Tensor) -> list[float]:
    """The means of `values` over the data-parallel ranks, in one all-reduce (every rank gets them)."""
    values = values.detach().float().clone()
    if state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=state.get_data_parallel_group())
        values /= state.get_data_parallel_world_size()
    return values.reshape(-1).tolist()


def data_parallel_mean(value: torch.Tensor) -> float:
    """The mean of `value` over the data-parallel ranks (every rank gets it)."""
    return data_parallel_means(value)[0]


class TrainEngine:
    def __init__(self, run: RunConfig, model_config: GPTConfig, faults: FaultInjection | None = None):
        self.faults = faults or FaultInjection()
        self.pipelined = run.dims.pipeline > 1
        self.micro_batches = run.gradient_accumulation_steps
        self.z_loss = model_config.z_loss_weight > 0
        self._terms: list[torch.Tensor] = []  # this step's micro-batches' (lm, z) losses on this rank
        self._batch_losses: tuple[float, float] | None = None  # the pipeline's, once gathered this step
        self.fp16 = bool(run.parallel.fp16)
        self.sharded_state = run.parallel.zero_stage > 0 or bool(run.parallel.bf16)  # DeepSpeed's flat shards
        rng.model_parallel_seed(run.model.seed)
        # Under ZeRO-3: stage-3 settings sized to the model, and the model partitioned as it is built.
        module, ds_config = build_module(run, model_config, self._loss)
        # Under ZeRO-0 in fp32 DeepSpeed hands the gradients straight to our optimizer without
        # measuring their norm; there the optimizer measures and clips (see GatedAdamW).
        own_norm = run.parallel.zero_stage == 0 and not (run.parallel.fp16 or run.parallel.bf16)
        ds_config = dict(ds_config, gradient_clipping=0.0) if own_norm else ds_config
        optim = run.optim
        self.optimizer = GatedAdamW(
            param_groups(module, optim.weight_decay, decay_embeddings=not optim.no_weight_decay_embeddings,
                         decoupled_lr=optim.decoupled_lr is not None),
            measure_grad_norm=own_norm, clip_grad=optim.clip_grad, lr=optim.lr,
            betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps,
            fused=True,  # torch's fused AdamW exists for CPU and CUDA; on CPU ~3x faster than foreach
        )
        self.ds = deepspeed_adapter.initialize(module, self.optimizer, ds_config, pipelined=self.pipelined,
                                               optimizer_measures_norm=own_norm)

    @property
    def model(self) -> torch.nn.Module:
        """This rank's piece of the model (the whole model split over TP, or a pipeline stage)."""
        return self.ds.module

    def _loss(self, terms: LossTerms) -> torch.Tensor:
        """What backward takes from a micro-batch's loss terms (model/gpt.py GPTLoss): lm + z while training,
        the LM loss alone in evaluation (no gradient: the pipeline's eval_batch). Records both terms."""
        lm = self.faults.scale_loss(terms.lm)
        if not torch.is_grad_enabled():
            return lm
        self._terms.append(torch.stack([lm.detach().float(), terms.z.detach().float()]))
        return lm + terms.z

    def set_lr(self, lr: float, decoupled_lr: float | None = None) -> None:
        """`lr` for every group; `decoupled_lr` (if given) for the --decoupled-lr groups."""
        for group in self.optimizer.param_groups:
            group["lr"] = decoupled_lr if decoupled_lr is not None and group.get("decoupled_lr") else lr

    def loss_scale(self) -> float:
        return float(getattr(self.ds.optimizer, "loss_scale", 1.0)) if self.fp16 else 1.0

    def train_step(self, batches: Iterator, gate: UpdateGate) -> StepResult:
        """One global batch: `micro_batches` (tokens, labels) pairs from `batches` on this rank."""
        self.ds.train()
        self._terms, self._batch_losses = [], None
        if self.pipelined:
            # The loss exists only on the last stage, and only once the schedule has run: the
            # optimizer asks for it when DeepSpeed steps it.
            self.optimizer.arm(gate, lambda: self._pipeline_batch_losses()[0])
            self.ds.train_batch(batches)
            loss, z_loss = self._pipeline_batch_losses()
        else:
            for micro in range(self.micro_batches):
                tokens, labels = next(batches)
                self.ds.backward(self._loss(self.model.loss(self.ds(tokens), labels)))
                if micro < self.micro_batches - 1:
                    self.ds.step()  # DeepSpeed counts micro-steps; only the last one updates
            loss, z_loss = data_parallel_means(torch.stack(self._terms).mean(dim=0))
            self.optimizer.arm(gate, lambda: loss)
            self.ds.step()
        norm = deepspeed_adapter.global_grad_norm(self.ds)
        decided = self.optimizer.decided  # False: DeepSpeed skipped a non-finite step before asking
        finite = decided and math.isfinite(loss) and (norm is None or math.isfinite(norm))
        return StepResult(loss, norm, finite, applied=self.optimizer.updated and self.ds.was_step_applied(),
                          z_loss=z_loss if self.z_loss else None)

    def optimizer_state_norms(self) -> dict[str, float]:
        """L2 norms of Adam's first and second moments over the whole model (collective, every rank).
        Model parameters are counted once (TP-split on every TP rank, replicated ones on TP rank 0);
        under ZeRO or bf16 the state lives on flat shards, summed over the data-parallel ranks,
        where weights replicated over TP ranks count once per TP rank."""
        squares = torch.zeros(2, dtype=torch.float32, device=self.ds.device)
        tp_rank0 = state.get_tensor_model_parallel_rank() == 0
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                moments = self.optimizer.state.get(param)
                if not moments or getattr(param, "ds_pipe_replicated", False):
                    continue
                if not self.sharded_state and not (is_tensor_parallel(param) or tp_rank0):
                    continue  # a replicated model weight: counted on TP rank 0
                squares[0] += moments["exp_avg"].float().pow(2).sum()
                squares[1] += moments["exp_avg_sq"].float().pow(2).sum()
        if self.sharded_state and state.get_data_parallel_world_size() > 1:
            dist.all_reduce(squares, group=state.get_data_parallel_group())
        if dist.get_world_size(state.get_model_parallel_group()) > 1:
            dist.all_reduce(squares, group=state.get_model_parallel_group())
        momentum, variance = squares.sqrt().tolist()
        return {"momentum_l2": momentum, "variance_l2": variance}

    def _pipeline_batch_losses(self) -> tuple[float, float]:
        """The global batch's mean LM loss and z-loss on every stage: averaged on the last stage, sent to
        all; gathered once a step (by the optimizer, or after the schedule where DeepSpeed skipped it)."""
        if self._batch_losses is None:
            losses = torch.zeros(2, dtype=torch.float32, device=self.ds.device)
            if self.ds.is_last_stage():
                losses += torch.tensor(data_parallel_means(torch.stack(self._terms).mean(dim=0)), device=losses.device)
            last = state.get_pipeline_model_parallel_ranks()[-1]
            dist.broadcast(losses, src=last, group=state.get_pipeline_model_parallel_group())
            self._batch_losses = tuple(losses.tolist())
        return self._batch_losses

    @torch.no_grad()
    def evaluate(self, batches: Iterator, global_batches: int) -> float:
        """The mean loss over `global_batches` global batches, identical on every rank."""
        if self.pipelined:
            return sum(float(self.ds.eval_batch(batches)) for _ in range(global_batches)) / global_batches
        self.ds.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.ds.device)
        for _ in range(global_batches * self.micro_batches):
            tokens, labels = next(batches)
            total += gpt_loss(self.ds(tokens), labels).float()
        return data_parallel_mean(total / (global_batches * self.micro_batches))
