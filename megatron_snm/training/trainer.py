"""The trainer: the training loop, and the one place that decides what happens to a run.

    trainer = build_run(run, vocab_size)       # process groups, engine, policy, callbacks
    result = trainer.train((train, valid, test))

One iteration reads top to bottom: the learning rate of the step; the callbacks' `pre_step`; the
engine runs the global batch under the spike policy's `UpdateGate` and reports a `StepResult`;
the policy judges and books it; the callbacks' `post_step` report it; then the loop decides:
stop (a divergence, unless a rollback recovers it; --exit-interval, --exit-duration-in-mins, a
signal under --exit-signal-handler: training/exit_conditions.py), evaluate, save. The iteration and the consumed samples live here
and nowhere else.

Datasets are indexable collections of {"text": int64 array [seq_length + 1]}; the trainer knows
nothing of tokenizers or files.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_snm.config import ConfigError, RunConfig
from megatron_snm.model.config import GPTConfig
from megatron_snm.parallel import lost_rank, state
from megatron_snm.parallel.distributed import DistEnv, device, discover
from megatron_snm.training import deepspeed_adapter
from megatron_snm.training.callbacks import StabilityCallback, StepReport
from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.format import tag_of
from megatron_snm.checkpoint.save_dir import claim_save_dir
from megatron_snm.checkpoint.save_load import (
    PendingSave, load_checkpoint, prune_checkpoints, run_metadata, start_checkpoint,
)
from megatron_snm.training.data import micro_batches
from megatron_snm.training.engine import TrainEngine
from megatron_snm.training.exit_conditions import ExitConditions
from megatron_snm.training.fault_injection import FaultInjection
from megatron_snm.training.housekeeping import Housekeeping
from megatron_snm.training.lr_schedule import LRSchedule, decoupled_lr_schedule, lr_schedule
from megatron_snm.training.metrics import TrainingMetrics, model_flops_per_token
from megatron_snm.training.profiler import StepProfiler
from megatron_snm.training.skip_ledger import LEDGER, append_ledger, ledger_iterations, read_ledger
from megatron_snm.training.spike_warning import SpikeWarning
from megatron_snm.training.spikes import SpikePolicy


# fp32 (or 16-bit + fp32 master) weights and Adam's two moments, with a margin.
_CHECKPOINT_BYTES_PER_PARAMETER = 16


@dataclass
class TrainResult:
    iteration: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> global batch loss
    z_losses: dict[int, float] = field(default_factory=dict)  # iteration -> its z-loss (--z-loss-weight)
    lrs: dict[int, float] = field(default_factory=dict)  # iteration -> its learning rate
    skipped: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    stopped: str | None = None  # why training ended early: diverged | signal | duration | interval
    rollbacks: list[tuple[int, int]] = field(default_factory=list)  # (diverged at, rolled back to)

    @property
    def diverged(self) -> bool:
        return self.stopped == "diverged"


class Trainer:
    def __init__(self, run: RunConfig, model_config: GPTConfig, faults: FaultInjection | None = None,
                 start_time: float | None = None):
        self.run, self.model_config = run, model_config
        self.start_time = start_time if start_time is not None else time.time()
        spike = run.spike
        # --inject-divergence-at's NaN losses, and what a test harness injects (training/fault_injection.py)
        self.faults = faults or FaultInjection()
        self.faults.add_loss_factors({it: float("nan") for it in run.divergence_iterations})
        self.metrics = TrainingMetrics(run, model_flops_per_token(model_config), rank=dist.get_rank())
        for note in run.notes:
            self.metrics.print(f" {note}")
        self.metrics.print(run.arguments_text())
        self.engine = TrainEngine(run, model_config, self.faults)
        self.policy = SpikePolicy(spike.spike_factor, spike.spike_window, spike.skip_spiky_steps,
                                  spike.max_skipped_steps, spike.spike_zscore, spike.grad_norm_spike_factor,
                                  spike.max_spiky_steps)
        self.schedule = lr_schedule(run)
        self.stability = StabilityCallback(self.engine.model, self.metrics, run.logging.log_stability_interval,
                                           spike.spike_factor)
        self.callbacks = [self.stability, self.metrics]
        self.warning = SpikeWarning(*run.spike_warning, spike.spike_window) if run.spike_warning else None
        logging = run.logging
        self.profiler = StepProfiler(logging.tensorboard_dir, logging.profile_step_start, logging.profile_step_end,
                                     dist.get_rank()) \
            if logging.profile and dist.get_rank() in (logging.profile_ranks or [0]) else None
        self.callbacks += [self.profiler] if self.profiler else []
        self.housekeeping = Housekeeping(run.batch)
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
        samples_after = self.consumed_samples + self.run.batch.global_batch_size
        progress = samples_after * self.run.lr_schedule.per_sample
        lr = self.schedule(progress)
        decoupled = decoupled_lr_schedule(self.schedule, self.run)
        decoupled_lr = decoupled(progress) if decoupled else None
        if it <= self.lr_scaled_until:  # after a rollback
            lr *= self.run.spike.rollback_lr_factor
            decoupled_lr = decoupled_lr * self.run.spike.rollback_lr_factor if decoupled else None
        self.engine.set_lr(lr, decoupled_lr)
        for callback in self.callbacks:
            callback.pre_step(it)
        spike_mean = self.policy.running_mean()
        self.faults.arm(it)
        started = time.perf_counter()
        result = self.engine.train_step(batches, self.policy.gate())
        step_time = time.perf_counter() - started
        self.faults.arm(None)
        verdict = self.policy.judge(result.loss, result.finite, result.grad_norm)
        self.policy.record(result.loss, verdict, result.applied, result.grad_norm)
        self.iteration, self.consumed_samples = it, self.consumed_samples + self.run.batch.global_batch_size
        logging = self.run.logging
        optimizer_states = self.engine.optimizer_state_norms() if logging.log_optimizer_states_to_tensorboard \
            and it % logging.tensorboard_log_interval == 0 else {}
        report = StepReport(it, self.consumed_samples, lr, result, verdict, self.engine.loss_scale(),
                            self.policy.skipped_total, self.policy.nonfinite_total, self.policy.spikes_total,
                            spike_mean, self.policy.grad_norm_spikes_total, step_time, optimizer_states)
        for callback in self.callbacks:
            callback.post_step(report)
        self.housekeeping.after_step(it)
        return report

    # --- the loop -----------------------------------------------------------------------------
    def _batches(self, dataset, start: int, samples: int) -> Iterator:
        return micro_batches(dataset, start, samples, self.run.batch.micro_batch_size,
                             state.get_data_parallel_rank(), state.get_data_parallel_world_size(), device(),
                             vocab_size=self.model_config.vocab_size, num_workers=self.run.batch.num_workers)

    def _evaluate(self, dataset, where: str, tag: str) -> float:
        started = time.perf_counter()
        batches = self._batches(dataset, 0, self.run.eval.eval_iters * self.run.batch.global_batch_size)
        with self.housekeeping.evaluation():
            loss = self.engine.evaluate(batches, self.run.eval.eval_iters)
        self.metrics.evaluation(where, loss, self.iteration, tag)
        self.metrics.timer("evaluate-time", time.perf_counter() - started, self.iteration)
        return loss

    def _metadata(self) -> dict:
        return dict(run_metadata(self.run, self.model_config), consumed_train_samples=self.consumed_samples,
                    spike_policy=self.policy.state_dict(), rollbacks=self.rollbacks,
                    last_good_checkpoint=self.last_good_checkpoint, lr_scaled_until=self.lr_scaled_until,
                    faults_fired=self.faults.fired, lr_schedule=dataclasses.asdict(self.schedule),
                    spike_warning=self.warning.state_dict() if self.warning else None)

    def _take_schedule(self, saved: dict | None) -> None:
        """Megatron's rule for a resumed LR schedule: the checkpoint's and this run's must agree, unless
        --override-opt_param-scheduler (take this run's) or --use-checkpoint-opt_param-scheduler (the
        checkpoint's)."""
        if saved is None or saved == dataclasses.asdict(self.schedule):
            return
        optim = self.run.optim
        if optim.use_checkpoint_opt_param_scheduler:
            self.schedule = LRSchedule(**saved)
            self.metrics.print(f" using the checkpoint's LR schedule {saved} (--use-checkpoint-opt_param-scheduler)")
        elif optim.override_opt_param_scheduler:
            self.metrics.print(f" using this run's LR schedule {dataclasses.asdict(self.schedule)}, not the "
                               f"checkpoint's {saved} (--override-opt_param-scheduler)")
        else:
            diff = ", ".join(f"{k} {v} in the checkpoint vs {getattr(self.schedule, k)} now"
                             for k, v in saved.items() if getattr(self.schedule, k) != v)
            raise ConfigError(f"the LR schedule differs from the checkpoint's in {self.run.checkpoint.load} ({diff}):"
                              " give --override-opt_param-scheduler to use this run's flags, or "
                              "--use-checkpoint-opt_param-scheduler to use the checkpoint's")

    def _restore(self, directory: str, iteration: int | None, **options) -> dict | None:
        """Model, optimizer, RNG, data position and spike state from a checkpoint (`options`: what
        not to load, see load_checkpoint)."""
        saved = load_checkpoint(self.engine.ds, directory, run_metadata(self.run, self.model_config), iteration,
                                **options)
        if saved is not None and not options.get("weights_only"):
            self.iteration, self.consumed_samples = saved["iteration"], saved["consumed_train_samples"]
            if "spike_policy" in saved:  # not in a weights-only checkpoint (checkpoint/write.py)
                self.policy.load_state_dict(saved["spike_policy"])
            if self.warning and saved.get("spike_warning"):
                self.warning.load_state_dict(saved["spike_warning"])
        return saved

    def load(self) -> None:
        """--load: the model, and unless --finetune / --no-load-optim / --no-load-rng say otherwise the
        optimizer, RNG states, iteration, data position, spike policy, rollback state and LR schedule."""
        ckpt = self.run.checkpoint
        current = run_metadata(self.run, self.model_config)
        saved = self._restore(ckpt.load, ckpt.load_iteration, optimizer=not ckpt.no_load_optim,
                              rng_states=not ckpt.no_load_rng, weights_only=ckpt.finetune)
        if saved is None:
            self.metrics.print(f" no checkpoint in {ckpt.load} (no 'latest' file): starting from scratch")
            return
        if ckpt.finetune:
            self.metrics.print(f" loaded the model weights of {ckpt.load} at iteration {saved['iteration']} "
                               "(--finetune): training starts at iteration 0 with a fresh optimizer")
            return
        self._take_schedule(saved.get("lr_schedule"))
        self.rollbacks = saved.get("rollbacks", 0)
        self.last_good_checkpoint = saved.get("last_good_checkpoint", saved["iteration"])
        self.lr_scaled_until = saved.get("lr_scaled_until", 0)
        self.faults.forget(saved.get("faults_fired", []))
        skipped = [what for what, flag in (("optimizer state", ckpt.no_load_optim), ("RNG states", ckpt.no_load_rng))
                   if flag]
        self.metrics.print(f" loaded checkpoint {ckpt.load} at iteration {self.iteration}"
                           + (f" without its {' and '.join(skipped)} (--no-load-*)" if skipped else ""))
        if "resharded_from" in saved:
            self.metrics.print(f" resharded it from {saved['resharded_from']} to this run's layout (weights"
                               + ("" if ckpt.no_load_optim else " and Adam's state") + "; RNG states start afresh)")
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
                # Where the run starts when the user chose it, rather than the newest checkpoint.
                start = 0 if ckpt.finetune else ckpt.load_iteration
                lock = claim_save_dir(ckpt.save, ckpt.load, int(total), start, ckpt.overwrite_newer_checkpoints)
            except CheckpointError as err:
                error = str(err)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise CheckpointError(box[0])
        return lock

    def train(self, datasets: tuple) -> TrainResult:
        lock = self._claim_save_dir() if self.run.checkpoint.save else None
        batch = self.run.batch
        try:
            with ExitConditions(batch.exit_interval, batch.exit_duration_in_mins, batch.exit_signal_handler,
                                self.start_time) as exits:
                self.housekeeping.start()
                return self._train(datasets, exits)
        finally:
            self.housekeeping.close()
            if self.profiler is not None:
                self.profiler.close()
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

    def _train(self, datasets: tuple, exits: ExitConditions) -> TrainResult:
        train_ds, valid_ds, test_ds = datasets
        run, ckpt = self.run, self.run.checkpoint
        if ckpt.load:
            self.load()
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
                                                self.faults.pause_in_save, asynchronous=ckpt.async_save)
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
            self.metrics.timer("save-checkpoint-time", time.perf_counter() - pending.started, pending.iteration)
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
            result.losses[it], result.lrs[it] = report.result.loss, report.lr
            if report.result.z_loss is not None:
                result.z_losses[it] = report.result.z_loss
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
                result.stopped = "diverged"
                break
            why = self.warning.observe(report.result.grad_norm, self.stability.last_figures) if self.warning else None
            if why:  # a likely precursor of a spike: a checkpoint now, for a rollback to find
                self.metrics.print(f" spike warning at iteration {it}: {why} (--spike-warning); saving a checkpoint")
                save()
            if valid_ds is not None and evaluating and it % run.eval.eval_interval == 0:
                result.valid_losses[it] = self._evaluate(valid_ds, f"iteration {it}", "validation")
            if ckpt.save_interval and it % ckpt.save_interval == 0:
                save()
            stop = exits.check(it, device()) if it < run.batch.train_iters else None
            if stop is not None:
                save()
                why = {"signal": f"received {exits.signal_name()} (--exit-signal-handler)",
                       "duration": f"--exit-duration-in-mins {run.batch.exit_duration_in_mins} have passed",
                       "interval": f"--exit-interval {run.batch.exit_interval}"}[stop]
                self.metrics.print(f" exiting at iteration {it}: {why}; "
                                   + (f"checkpoint in {ckpt.save}, resume with --load {ckpt.save}" if ckpt.save
                                      else "nothing saved (no --save)"))
                result.stopped = stop
                break

        if result.stopped is None:
            save()
        publish()
        if result.stopped is None and test_ds is not None and evaluating:
            result.test_loss = self._evaluate(test_ds, "the end of training for test data", "test")
        self.metrics.close()
        return result


def start_distributed(run: RunConfig, env: DistEnv | None = None) -> None:
    """torch.distributed through DeepSpeed (idempotent: a test may have started torch.distributed
    itself) and the run's TP/PP/DP groups, on every rank."""
    deepspeed_adapter.init_distributed(env or discover(), cpu_shm_comm=run.parallel.cpu_shm_comm,
                                       timeout_minutes=run.parallel.distributed_timeout_minutes)
    state.initialize_model_parallel(run.dims.tensor, run.dims.pipeline)
    lost_rank.record_peers(run.parallel.distributed_timeout_minutes)  # to name a rank that is lost later


def build_run(run: RunConfig, vocab_size: int, faults: FaultInjection | None = None,
              env: DistEnv | None = None, start_time: float | None = None) -> Trainer:
    """Everything a run needs before its data: the entry point, the tests and the benchmarks all
    start here. `start_time` (time.time() at the program's start) is what --exit-duration-in-mins
    counts from (default: now)."""
    if run.parallel.fp16 and not torch.cuda.is_available():  # DeepSpeed's CPU accelerator has no fp16 training
        raise ConfigError("--fp16 (or fp16.enabled in the DeepSpeed JSON) needs a GPU: there is none here, and "
                          "DeepSpeed does not train in fp16 on CPU; use --bf16 (bfloat16 runs on CPU) or drop --fp16 "
                          "for fp32")
    start_distributed(run, env)
    return Trainer(run, run.model_config(vocab_size), faults, start_time)
