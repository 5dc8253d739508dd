"""The trainer: the training loop, and the one place that decides what happens to a run.

    trainer = build_run(run, vocab_size)       # process groups, engine, policy, callbacks
    result = trainer.train((train, valid, test))

One iteration reads top to bottom: the learning rate of the step; the callbacks' `pre_step`; the
engine runs the global batch under the spike policy's `UpdateGate` and reports a `StepResult`;
the policy judges and books it; the callbacks' `post_step` report it; then the loop decides:
stop (too many skipped steps), evaluate, save. The iteration and the consumed samples live here
and nowhere else.

Datasets are indexable collections of {"text": int64 array [seq_length + 1]}; the trainer knows
nothing of tokenizers or files.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_snm.config import RunConfig
from megatron_snm.config.resolve import parse_iteration_list
from megatron_snm.model.config import GPTConfig
from megatron_snm.parallel import state
from megatron_snm.parallel.distributed import DistEnv, device, discover
from megatron_snm.training import deepspeed_adapter
from megatron_snm.training.callbacks import StabilityCallback, StepReport
from megatron_snm.training.checkpoint_errors import CheckpointError
from megatron_snm.training.checkpointing import (
    PendingSave, load_checkpoint, prune_checkpoints, run_metadata, start_checkpoint, tag_of,
)
from megatron_snm.training.data import micro_batches
from megatron_snm.training.engine import TrainEngine
from megatron_snm.training.fault_injection import FaultInjection
from megatron_snm.training.lr_schedule import LRSchedule
from megatron_snm.training.metrics import TrainingMetrics, model_flops_per_token
from megatron_snm.training.save_dir import claim_save_dir
from megatron_snm.training.skip_ledger import LEDGER, append_ledger, ledger_iterations, read_ledger
from megatron_snm.training.spikes import SpikePolicy


# fp32 (or 16-bit + fp32 master) weights and Adam's two moments, with a margin.
_CHECKPOINT_BYTES_PER_PARAMETER = 16


@dataclass
class TrainResult:
    iteration: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> global batch loss
    skipped: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    diverged: bool = False
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (diverged at, rolled back to)


class Trainer:
    def __init__(self, run: RunConfig, model_config: GPTConfig, faults: FaultInjection | None = None):
        self.run, self.model_config = run, model_config
        spike = run.spike
        self.faults = faults or FaultInjection.from_env(parse_iteration_list(spike.inject_divergence_at))
        self.engine = TrainEngine(run, model_config, self.faults)
        self.policy = SpikePolicy(spike.spike_factor, spike.spike_window, spike.skip_spiky_steps,
                                  spike.max_skipped_steps, spike.spike_zscore, spike.grad_norm_spike_factor,
                                  spike.max_spiky_steps)
        self.schedule = LRSchedule(run.optim.lr, run.optim.min_lr, run.optim.lr_warmup_iters,
                                   run.optim.lr_decay_iters, run.optim.lr_decay_style)
        self.metrics = TrainingMetrics(
            rank=dist.get_rank(), world_size=dist.get_world_size(), train_iters=run.batch.train_iters,
            global_batch_size=run.batch.global_batch_size, seq_length=run.model.seq_length,
            flops_per_token=model_flops_per_token(model_config), log_interval=run.logging.log_interval,
            tensorboard_dir=run.logging.tensorboard_dir)
        self.callbacks = [StabilityCallback(self.engine.model, self.metrics, run.logging.log_stability_interval,
                                            spike.spike_factor),
                          self.metrics]
        self.iteration = 0
        self.consumed_samples = 0
        gbs = run.batch.global_batch_size
        # Iterations whose global batches are read and dropped: the flags', and the ledger's (rollbacks).
        self.skip_iterations = set(spike.iterations_to_skip or []) | {
            it for item in spike.skip_samples or [] for start, end in [map(int, item.split(":"))]
            for it in range(start // gbs + 1, (end - 1) // gbs + 2)}
        for directory in {run.checkpoint.save, run.checkpoint.load} - {None}:
            self.skip_iterations |= ledger_iterations(read_ledger(directory))
        self.rollbacks = 0
        self.last_good_checkpoint: int | None = None  # the newest checkpoint saved outside a spike streak
        self.lr_scaled_until = 0  # after a rollback: --rollback-lr-factor up to this iteration
        self.pending: PendingSave | None = None  # a checkpoint written but not yet published

    # --- one iteration ----------------------------------------------------------------------
    def step(self, batches: Iterator) -> StepReport:
        """Trains on the next global batch of `batches` and books it."""
        it = self.iteration + 1
        lr = self.schedule(it) * (self.run.spike.rollback_lr_factor if it <= self.lr_scaled_until else 1.0)
        self.engine.set_lr(lr)
        for callback in self.callbacks:
            callback.pre_step(it)
        spike_mean = self.policy.running_mean()
        self.faults.arm(it)
        result = self.engine.train_step(batches, self.policy.gate())
        self.faults.arm(None)
        verdict = self.policy.judge(result.loss, result.finite, result.grad_norm)
        self.policy.record(result.loss, verdict, result.applied, result.grad_norm)
        self.iteration, self.consumed_samples = it, self.consumed_samples + self.run.batch.global_batch_size
        report = StepReport(it, self.consumed_samples, lr, result, verdict, self.engine.loss_scale(),
                            self.policy.skipped_total, self.policy.nonfinite_total, self.policy.spikes_total,
                            spike_mean, self.policy.grad_norm_spikes_total)
        for callback in self.callbacks:
            callback.post_step(report)
        return report

    # --- the loop -----------------------------------------------------------------------------
    def _batches(self, dataset, start: int, samples: int) -> Iterator:
        return micro_batches(dataset, start, samples, self.run.batch.micro_batch_size,
                             state.get_data_parallel_rank(), state.get_data_parallel_world_size(), device(),
                             vocab_size=self.model_config.vocab_size)

    def _evaluate(self, dataset, where: str, tag: str) -> float:
        batches = self._batches(dataset, 0, self.run.eval.eval_iters * self.run.batch.global_batch_size)
        loss = self.engine.evaluate(batches, self.run.eval.eval_iters)
        self.metrics.evaluation(where, loss, self.iteration, tag)
        return loss

    def _metadata(self) -> dict:
        return dict(run_metadata(self.run, self.model_config), consumed_train_samples=self.consumed_samples,
                    spike_policy=self.policy.state_dict(), rollbacks=self.rollbacks,
                    last_good_checkpoint=self.last_good_checkpoint, lr_scaled_until=self.lr_scaled_until,
                    faults_fired=self.faults.fired)

    def _restore(self, directory: str, iteration: int | None) -> dict | None:
        """Model, optimizer, RNG, data position and spike state from a checkpoint."""
        saved = load_checkpoint(self.engine.ds, directory, run_metadata(self.run, self.model_config), iteration)
        if saved is not None:
            self.iteration, self.consumed_samples = saved["iteration"], saved["consumed_train_samples"]
            self.policy.load_state_dict(saved["spike_policy"])
        return saved

    def _load(self) -> None:
        ckpt = self.run.checkpoint
        current = run_metadata(self.run, self.model_config)
        saved = self._restore(ckpt.load, ckpt.load_iteration)
        if saved is None:
            self.metrics.print(f" no checkpoint in {ckpt.load} (no 'latest' file): starting from scratch")
            return
        self.rollbacks = saved.get("rollbacks", 0)
        self.last_good_checkpoint = saved.get("last_good_checkpoint", saved["iteration"])
        self.lr_scaled_until = saved.get("lr_scaled_until", 0)
        self.faults.forget(saved.get("faults_fired", []))
        self.metrics.print(f" loaded checkpoint {ckpt.load} at iteration {self.iteration}")
        # Megatron allows resuming with other data, seed or batch flags; say which differ.
        differ = [f"{k}: {saved['args'][k]!r} -> {v!r}" for k, v in current["args"].items()
                  if k in saved["args"] and saved["args"][k] != v and k not in ("load", "save", "local_rank")]
        if differ:
            self.metrics.print(" arguments that differ from the checkpoint's: " + "; ".join(differ))

    def _claim_save_dir(self):
        """Rank 0 locks and checks --save; every rank raises the same CheckpointError if it cannot."""
        ckpt, lock, error = self.run.checkpoint, None, None
        local = sum(p.numel() for p in self.engine.model.parameters()) * _CHECKPOINT_BYTES_PER_PARAMETER
        total = torch.tensor(float(local) / self.run.dims.data, device=state.collective_device())
        dist.all_reduce(total)
        if dist.get_rank() == 0:
            try:
                lock = claim_save_dir(ckpt.save, ckpt.load, int(total))
            except CheckpointError as err:
                error = str(err)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise CheckpointError(box[0])
        return lock

    def train(self, datasets: tuple) -> TrainResult:
        lock = self._claim_save_dir() if self.run.checkpoint.save else None
        try:
            return self._train(datasets)
        finally:
            if lock is not None:
                lock.release()

    def _skip(self, batches: Iterator) -> None:
        """Reads the next global batch and drops it: the iteration passes without training."""
        for _ in range(self.run.gradient_accumulation_steps):
            next(batches)
        self.iteration += 1
        self.consumed_samples += self.run.batch.global_batch_size
        self.metrics.print(f" skipped the data of iteration {self.iteration} (--iterations-to-skip, --skip-samples "
                           f"or {LEDGER})")

    def _rollback(self, train_ds, why: str) -> bool:
        """After a divergence: back to the last good checkpoint, past the data that led here.
        False when no rollback is possible (then the run stops)."""
        spike, ckpt = self.run.spike, self.run.checkpoint
        if spike.on_divergence != "rollback" or self.rollbacks >= spike.max_rollbacks \
                or self.last_good_checkpoint is None:
            return False
        diverged_at, gbs = self.iteration, self.run.batch.global_batch_size
        self._restore(ckpt.save, self.last_good_checkpoint)
        first, last = self.iteration + 1, min(diverged_at + spike.rollback_margin, self.run.batch.train_iters)
        samples = [self.consumed_samples, self.consumed_samples + (last - first + 1) * gbs]
        self.rollbacks += 1
        self.skip_iterations |= set(range(first, last + 1))
        self.lr_scaled_until = last + spike.rollback_lr_iters if spike.rollback_lr_iters else 0
        if dist.get_rank() == 0:
            describe = getattr(train_ds, "describe", None)
            append_ledger(ckpt.save, dict(
                reason="rollback", diverged_at=diverged_at, checkpoint=tag_of(self.iteration), iterations=[first, last],
                samples=samples, documents=[describe(i) for i in range(*samples)] if describe else None))
        self.metrics.print(
            f" rollback {self.rollbacks}/{spike.max_rollbacks}: diverged at iteration {diverged_at} "
            f"({why}); reloaded {tag_of(self.iteration)}, skipping "
            f"iterations {first}-{last} (training samples {samples[0]}-{samples[1] - 1}, recorded in "
            f"{os.path.join(ckpt.save, LEDGER)})"
            + (f"; learning rate x {spike.rollback_lr_factor} up to iteration {self.lr_scaled_until}"
               if self.lr_scaled_until else ""))
        return True

    def _train(self, datasets: tuple) -> TrainResult:
        train_ds, valid_ds, test_ds = datasets
        run, ckpt = self.run, self.run.checkpoint
        if ckpt.load:
            self._load()
        result = TrainResult(iteration=self.iteration)
        # Nothing to save again right after loading, unless the run saves somewhere else.
        resumed_in_save_dir = ckpt.load and ckpt.save and os.path.realpath(ckpt.load) == os.path.realpath(ckpt.save)
        last_saved = self.iteration if resumed_in_save_dir and self.iteration else None

        def save() -> None:
            nonlocal last_saved
            if ckpt.save and last_saved != self.iteration:
                publish()  # the previous asynchronous save, if it is still being written
                if self.policy.skipped_in_a_row == 0 and self.policy.spiky_in_a_row == 0:
                    self.last_good_checkpoint = self.iteration
                start = time.perf_counter()
                self.pending = start_checkpoint(self.engine.ds, ckpt.save, self.iteration, self._metadata(),
                                                self.faults, asynchronous=ckpt.async_save)
                self.pending.blocked_s, self.pending.started = time.perf_counter() - start, start
                last_saved = self.iteration
                if not ckpt.async_save:
                    publish()

        def publish(wait: bool = True) -> None:
            """Publishes the pending checkpoint (an asynchronous one only once it is written
            everywhere, unless `wait`)."""
            pending = self.pending
            if pending is None or (not wait and not pending.written_everywhere()):
                return
            self.pending = None
            path = pending.finish()
            size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            self.metrics.print(f" saved checkpoint at iteration {pending.iteration} to {path} ({size / 2**20:.1f} "
                               f"MiB; the loop was blocked {pending.blocked_s:.2f} s, "
                               f"{time.perf_counter() - pending.started:.2f} s until published)")
            if ckpt.keep_last_n_checkpoints and dist.get_rank() == 0:
                for tag in prune_checkpoints(ckpt.save, ckpt.keep_last_n_checkpoints, self.last_good_checkpoint):
                    self.metrics.print(f" deleted checkpoint {tag} (--keep-last-n-checkpoints "
                                       f"{ckpt.keep_last_n_checkpoints})")

        def batches_from_here() -> Iterator:
            return self._batches(train_ds, self.consumed_samples, run.batch.train_iters * run.batch.global_batch_size)

        evaluating = run.eval.eval_iters > 0
        train_batches = batches_from_here()
        while self.iteration < run.batch.train_iters:
            if self.iteration + 1 in self.skip_iterations:
                self._skip(train_batches)
                result.iteration = self.iteration
                continue
            report = self.step(train_batches)
            publish(wait=False)
            it = result.iteration = report.iteration
            result.losses[it] = report.result.loss
            if not report.result.applied:
                result.skipped.append(it)
            if report.verdict.spike:
                result.spikes.append(it)
            if self.policy.diverged():
                why = self.policy.divergence()
                publish()
                if self._rollback(train_ds, why):
                    result.rollbacks.append((it, self.iteration))
                    result.iteration, last_saved = self.iteration, self.iteration
                    train_batches = batches_from_here()
                    continue
                save()
                self.metrics.print(
                    f" stopping at iteration {it}: {why}; the run is diverging. "
                    + (f"Checkpoint saved in {ckpt.save}; " if ckpt.save else "")
                    + "lower --lr or check the data before resuming")
                result.diverged = True
                break
            if valid_ds is not None and evaluating and it % run.eval.eval_interval == 0:
                result.valid_losses[it] = self._evaluate(valid_ds, f"iteration {it}", "validation")
            if ckpt.save_interval and it % ckpt.save_interval == 0:
                save()

        if not result.diverged:
            save()
        publish()
        if not result.diverged and test_ds is not None and evaluating:
            result.test_loss = self._evaluate(test_ds, "the end of training for test data", "test")
        self.metrics.close()
        return result


def start_distributed(run: RunConfig, env: DistEnv | None = None) -> None:
    """torch.distributed through DeepSpeed (idempotent: a test may have started torch.distributed
    itself) and the run's TP/PP/DP groups, on every rank."""
    deepspeed_adapter.init_distributed(env or discover(), cpu_shm_comm=run.parallel.cpu_shm_comm)
    state.initialize_model_parallel(run.dims.tensor, run.dims.pipeline)


def build_run(run: RunConfig, vocab_size: int, faults: FaultInjection | None = None,
              env: DistEnv | None = None) -> Trainer:
    """Everything a run needs before its data: the entry point, the tests and the benchmarks all
    start here."""
    start_distributed(run, env)
    return Trainer(run, run.model_config(vocab_size), faults)
