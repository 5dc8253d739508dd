"""The DeepSpeed engine around our model, and one training / evaluation step on it.

- PP = 1: `GPTModel` in DeepSpeed's engine (ZeRO 0-3), with parallel/state.py's groups as its
  `mpu`, so ZeRO shards over DP only and gradient norms count TP-split weights correctly. We run
  the micro-batches (forward, backward, step) ourselves.
- PP > 1: the model as a PipelineModule (pipeline/module.py) in DeepSpeed's pipeline engine
  (1F1B, ZeRO 0-1), which runs the micro-batches itself (`train_batch`).

Either way the optimizer is GatedAdamW: DeepSpeed reduces, unscales and clips the gradients, then
asks it to step, and it asks `_allow_update` whether to, with the global batch loss and gradient
norm in hand, so a non-finite or spiky step is skipped identically on every rank.
"""
from __future__ import annotations

import os
from typing import Iterator

import deepspeed
import torch
import torch.distributed as dist

from megatron_snm.config import Config
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import gpt_loss
from megatron_snm.model.monitor import StabilityMonitor
from megatron_snm.parallel import random as tp_random
from megatron_snm.parallel import state
from megatron_snm.training.checkpointing import SafeCheckpointEngine
from megatron_snm.training.optimizer import GatedAdamW, param_groups
from megatron_snm.training.spikes import SpikePolicy, Verdict
from megatron_snm.training.zero3 import apply_zero_defaults, build_gpt_model

# Test hook: "ITER:FACTOR,..." multiplies the training loss of those iterations (nan, or e.g. 50
# for a spike), so tests can exercise the skip and spike paths.
INJECT_LOSS_ENV = "MEGATRON_SNM_TEST_INJECT_LOSS"


def _injected_factors() -> dict[int, float]:
    spec = os.environ.get(INJECT_LOSS_ENV, "")
    return {int(it): float(f) for it, f in (item.split(":") for item in spec.split(",") if item)}


class _StateMPU:
    """parallel/state.py's groups under the names DeepSpeed's `mpu` argument expects."""

    get_data_parallel_group = staticmethod(state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(state.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(state.get_tensor_model_parallel_src_rank)
    get_model_parallel_group = staticmethod(state.get_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(state.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(state.get_model_parallel_group())


class TrainEngine:
    """One global batch per `train_step`; subclasses differ in who runs the micro-batches."""

    def __init__(self, cfg: Config, gpt_config: GPTConfig, ds_config: dict, policy: SpikePolicy):
        self.cfg, self.gpt_config, self.policy = cfg, gpt_config, policy
        self.iteration = 0
        self.verdict: Verdict | None = None
        self._inject = _injected_factors()
        tp_random.model_parallel_seed(cfg.seed)
        self.ds_config = ds_config = apply_zero_defaults(ds_config, gpt_config, cfg.tensor_model_parallel_size)
        module = self._build_module()
        # Under ZeRO-0 in fp32 DeepSpeed hands the gradients straight to our optimizer without
        # measuring their norm; there the optimizer measures and clips (see GatedAdamW).
        plain = cfg.zero_stage == 0 and not (cfg.fp16 or cfg.bf16)
        if plain:
            ds_config = dict(ds_config, gradient_clipping=0.0)
        self.optimizer = GatedAdamW(
            param_groups(module, cfg.weight_decay, decay_embeddings=not cfg.no_weight_decay_embeddings),
            allow_update=self._allow_update, measure_grad_norm=plain, clip_grad=cfg.clip_grad,
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            fused=True,  # torch's fused AdamW exists for CPU and CUDA; on CPU ~3x faster than foreach
        )
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=self.optimizer, config=ds_config,
                                               mpu=self._mpu())
        if plain and self.engine.optimizer is not self.optimizer:
            raise RuntimeError("DeepSpeed wrapped the optimizer under ZeRO-0 fp32; gradient clipping would be lost")
        if plain and state.get_data_parallel_world_size() == 1:
            # One data-parallel rank: nothing to all-reduce, so spare DeepSpeed's flatten, no-op
            # all-reduce and copy-back of every gradient each step.
            self.engine.enable_backward_allreduce = False
        self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine._config)
        self.monitor = StabilityMonitor(self.engine.module)
        self.gas = self.engine.gradient_accumulation_steps()

    # --- hooks for subclasses ---------------------------------------------------------------
    def _build_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def _mpu(self):
        return None

    def _batch_loss(self) -> float:
        """The global batch's mean loss, identical on every rank; called inside the optimizer step."""
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------
    def loss(self, per_token_or_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        loss = per_token_or_logits.mean() if labels is None else gpt_loss(per_token_or_logits, labels)
        if self.engine_training and self.iteration in self._inject:
            loss = loss * self._inject[self.iteration]
        return loss

    @property
    def engine_training(self) -> bool:
        return self.engine.module.training

    def _allow_update(self, grad_norm: float | None) -> bool:
        self.verdict = self.policy.judge(self._batch_loss(), grad_norm)
        return not self.verdict.skip

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self.cfg.fp16 else 1.0

    def train_step(self, batches: Iterator) -> tuple[Verdict, bool]:
        """Runs one global batch; returns the verdict on it and whether the update was applied."""
        self.iteration += 1
        self.verdict = None
        self.optimizer.new_step()
        loss = self._run_train_batch(batches)
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if self.verdict is None:  # DeepSpeed skipped the step before asking (overflow, non-finite gradients)
            self.verdict = self.policy.judge(loss, float("inf") if norm is None else norm)
            applied = False
        else:
            applied = self.optimizer.updated and self.engine.was_step_applied()
        self.verdict = Verdict(loss, norm, self.verdict.nonfinite, self.verdict.spike, self.verdict.skip)
        return self.verdict, applied

    def _run_train_batch(self, batches: Iterator) -> float:
        raise NotImplementedError

    def evaluate(self, batches: Iterator, global_batches: int) -> float:
        raise NotImplementedError


class DenseEngine(TrainEngine):
    """PP = 1: the whole model on each rank (split over TP), DeepSpeed engine, ZeRO 0-3."""

    def _build_module(self):
        return build_gpt_model(self.gpt_config, self.ds_config, self._mpu())  # under ZeRO-3 partitioned as it is built

    def _mpu(self):
        return _StateMPU

    def _run_train_batch(self, batches):
        self.engine.train()
        losses = []
        for micro in range(self.gas):
            tokens, labels = next(batches)
            loss = self.loss(self.engine(tokens, labels))
            self.engine.backward(loss)
            losses.append(loss.detach().float())
            if micro < self.gas - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; only the last one updates
        self._loss = self._dp_mean(torch.stack(losses).mean())
        self.engine.step()
        return self._loss

    def _dp_mean(self, value: torch.Tensor) -> float:
        if state.get_data_parallel_world_size() > 1:
            value = value.clone()
            dist.all_reduce(value, group=state.get_data_parallel_group())
            value /= state.get_data_parallel_world_size()
        return float(value)

    def _batch_loss(self):
        return self._loss

    @torch.no_grad()
    def evaluate(self, batches, global_batches):
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float32, device=self.engine.device)
        for _ in range(global_batches * self.gas):
            tokens, labels = next(batches)
            total += self.loss(self.engine(tokens, labels)).float()
        return self._dp_mean(total / (global_batches * self.gas))


class PipelineEngine(TrainEngine):
    """PP > 1: DeepSpeed's pipeline engine over our stages, 1F1B, ZeRO 0-1."""

    def _build_module(self):
        from megatron_snm.pipeline.module import gpt_pipeline
        return gpt_pipeline(self.gpt_config, self.loss, state.get_tensor_model_parallel_world_size(),
                            state.get_pipeline_model_parallel_world_size(), state.get_data_parallel_world_size())

    def _batch_loss(self):
        # At the optimizer step only the last stage has the losses: average there, send to all stages.
        engine = self.engine
        loss = torch.zeros(1, dtype=torch.float32, device=engine.device)
        if engine.is_last_stage():
            loss += engine.total_loss.detach().float().reshape(1) / self.gas
            if state.get_data_parallel_world_size() > 1:
                dist.all_reduce(loss, group=state.get_data_parallel_group())
                loss /= state.get_data_parallel_world_size()
        last = state.get_pipeline_model_parallel_ranks()[-1]
        dist.broadcast(loss, src=last, group=state.get_pipeline_model_parallel_group())
        return float(loss)

    def _run_train_batch(self, batches):
        return float(self.engine.train_batch(batches))

    @torch.no_grad()
    def evaluate(self, batches, global_batches):
        total = 0.0
        for _ in range(global_batches):
            total += float(self.engine.eval_batch(batches))
        return total / global_batches


def build_train_engine(cfg: Config, gpt_config: GPTConfig, ds_config: dict, policy: SpikePolicy) -> TrainEngine:
    """Needs torch.distributed and parallel/state.py's groups initialised."""
    kind = PipelineEngine if cfg.pipeline_model_parallel_size > 1 else DenseEngine
    return kind(cfg, gpt_config, ds_config, policy)
