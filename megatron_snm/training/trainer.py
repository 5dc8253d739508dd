"""The trainer: the training loop, and the one place that decides what happens to a run.

    trainer = build_run(run, vocab_size)       # process groups, engine, policy, callbacks
    result = trainer.train((train, valid, test))

One iteration reads top to bottom: the learning rate of the step; the callbacks' `pre_step`; the
engine runs the global batch under the spike policy's `UpdateGate` and reports a `StepResult`;
the policy judges and books it; the callbacks' `post_step` report it; then the loop decides:
stop (too many skipped steps; --exit-interval, --exit-duration-in-mins, a signal under
--exit-signal-handler: training/exit_conditions.py), evaluate, save. The iteration and the consumed
samples live here and nowhere else.

Datasets are indexable collections of {"text": int64 array [seq_length + 1]}; the trainer knows
nothing of tokenizers or files.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch.distributed as dist

from megatron_snm.config import ConfigError, RunConfig
from megatron_snm.model.config import GPTConfig
from megatron_snm.parallel import state
from megatron_snm.parallel.distributed import DistEnv, device, discover
from megatron_snm.training import deepspeed_adapter
from megatron_snm.training.callbacks import StabilityCallback, StepReport
from megatron_snm.training.checkpointing import load_checkpoint, run_metadata, save_checkpoint
from megatron_snm.training.data import micro_batches
from megatron_snm.training.engine import TrainEngine
from megatron_snm.training.exit_conditions import ExitConditions
from megatron_snm.training.fault_injection import FaultInjection
from megatron_snm.training.lr_schedule import LRSchedule
from megatron_snm.training.metrics import TrainingMetrics, model_flops_per_token
from megatron_snm.training.spikes import SpikePolicy


@dataclass
class TrainResult:
    iteration: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> global batch loss
    lrs: dict[int, float] = field(default_factory=dict)  # iteration -> its learning rate
    skipped: list[int] = field(default_factory=list)
    spikes: list[int] = field(default_factory=list)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    stopped: str | None = None  # why training ended early: diverged | signal | duration | interval

    @property
    def diverged(self) -> bool:
        return self.stopped == "diverged"


def lr_schedule(run: RunConfig) -> LRSchedule:
    optim, lengths = run.optim, run.lr_schedule
    return LRSchedule(optim.lr, optim.min_lr, lengths.warmup, lengths.decay, optim.lr_decay_style,
                      optim.lr_warmup_init)


class Trainer:
    def __init__(self, run: RunConfig, model_config: GPTConfig, faults: FaultInjection | None = None,
                 start_time: float | None = None):
        self.run, self.model_config = run, model_config
        self.start_time = start_time if start_time is not None else time.time()
        self.faults = faults or FaultInjection.from_env()
        self.metrics = TrainingMetrics(run, model_flops_per_token(model_config), rank=dist.get_rank())
        for note in run.notes:
            self.metrics.print(f" {note}")
        self.metrics.print(run.arguments_text())
        self.engine = TrainEngine(run, model_config, self.faults)
        spike = run.spike
        self.policy = SpikePolicy(spike.spike_factor, spike.spike_window, spike.skip_spiky_steps,
                                  spike.max_skipped_steps)
        self.schedule = lr_schedule(run)
        self.callbacks = [StabilityCallback(self.engine.model, self.metrics, run.logging.log_stability_interval,
                                            spike.spike_factor),
                          self.metrics]
        self.iteration = 0
        self.consumed_samples = 0

    # --- one iteration ----------------------------------------------------------------------
    def step(self, batches: Iterator) -> StepReport:
        """Trains on the next global batch of `batches` and books it."""
        it = self.iteration + 1
        samples_after = self.consumed_samples + self.run.batch.global_batch_size
        lr = self.schedule(samples_after * self.run.lr_schedule.per_sample)
        self.engine.set_lr(lr)
        for callback in self.callbacks:
            callback.pre_step(it)
        spike_mean = self.policy.running_mean()
        self.faults.arm(it)
        started = time.perf_counter()
        result = self.engine.train_step(batches, self.policy.gate())
        step_time = time.perf_counter() - started
        self.faults.arm(None)
        verdict = self.policy.judge(result.loss, result.finite)
        self.policy.record(result.loss, verdict, result.applied)
        self.iteration, self.consumed_samples = it, self.consumed_samples + self.run.batch.global_batch_size
        logging = self.run.logging
        optimizer_states = self.engine.optimizer_state_norms() if logging.log_optimizer_states_to_tensorboard \
            and it % logging.tensorboard_log_interval == 0 else {}
        report = StepReport(it, self.consumed_samples, lr, result, verdict, self.engine.loss_scale(),
                            self.policy.skipped_total, self.policy.nonfinite_total, self.policy.spikes_total,
                            spike_mean, step_time, optimizer_states)
        for callback in self.callbacks:
            callback.post_step(report)
        return report

    # --- the loop -----------------------------------------------------------------------------
    def _batches(self, dataset, start: int, samples: int) -> Iterator:
        return micro_batches(dataset, start, samples, self.run.batch.micro_batch_size,
                             state.get_data_parallel_rank(), state.get_data_parallel_world_size(), device(),
                             self.run.batch.num_workers)

    def _evaluate(self, dataset, where: str, tag: str) -> float:
        started = time.perf_counter()
        batches = self._batches(dataset, 0, self.run.eval.eval_iters * self.run.batch.global_batch_size)
        loss = self.engine.evaluate(batches, self.run.eval.eval_iters)
        self.metrics.evaluation(where, loss, self.iteration, tag)
        self.metrics.timer("evaluate-time", time.perf_counter() - started, self.iteration)
        return loss

    def _metadata(self) -> dict:
        return dict(run_metadata(self.run, self.model_config), consumed_train_samples=self.consumed_samples,
                    spike_policy=self.policy.state_dict(), lr_schedule=dataclasses.asdict(self.schedule))

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

    def load(self) -> None:
        """--load: the model, and unless --finetune / --no-load-optim / --no-load-rng say otherwise the
        optimizer, RNG states, iteration, data position, spike policy and LR schedule."""
        ckpt = self.run.checkpoint
        saved = load_checkpoint(self.engine.ds, ckpt.load, run_metadata(self.run, self.model_config),
                                optimizer=not ckpt.no_load_optim, rng_states=not ckpt.no_load_rng,
                                weights_only=ckpt.finetune)
        if saved is None:
            self.metrics.print(f" no checkpoint in {ckpt.load} (no 'latest' file): starting from scratch")
            return
        if ckpt.finetune:
            self.metrics.print(f" loaded the model weights of {ckpt.load} at iteration {saved['iteration']} "
                               "(--finetune): training starts at iteration 0 with a fresh optimizer")
            return
        self._take_schedule(saved.get("lr_schedule"))
        self.iteration, self.consumed_samples = saved["iteration"], saved["consumed_train_samples"]
        self.policy.load_state_dict(saved["spike_policy"])
        skipped = [what for what, flag in (("optimizer state", ckpt.no_load_optim), ("RNG states", ckpt.no_load_rng))
                   if flag]
        self.metrics.print(f" loaded checkpoint {ckpt.load} at iteration {self.iteration}"
                           + (f" without its {' and '.join(skipped)} (--no-load-*)" if skipped else ""))

    def train(self, datasets: tuple) -> TrainResult:
        with ExitConditions(self.run.batch.exit_interval, self.run.batch.exit_duration_in_mins,
                            self.run.batch.exit_signal_handler, self.start_time) as exits:
            return self._train(datasets, exits)

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
                started = time.perf_counter()
                path = save_checkpoint(self.engine.ds, ckpt.save, self.iteration, self._metadata(), self.faults)
                self.metrics.print(f" saved checkpoint at iteration {self.iteration} to {path}")
                self.metrics.timer("save-checkpoint-time", time.perf_counter() - started, self.iteration)
                last_saved = self.iteration

        evaluating = run.eval.eval_iters > 0
        train_batches = self._batches(train_ds, self.consumed_samples,
                                      run.batch.train_iters * run.batch.global_batch_size)
        while self.iteration < run.batch.train_iters:
            report = self.step(train_batches)
            it = result.iteration = report.iteration
            result.losses[it], result.lrs[it] = report.result.loss, report.lr
            if not report.result.applied:
                result.skipped.append(it)
            if report.verdict.spike:
                result.spikes.append(it)
            if self.policy.should_stop():
                save()
                self.metrics.print(
                    f" stopping at iteration {it}: {self.policy.skipped_in_a_row} steps in a row were skipped "
                    f"(--max-skipped-steps {run.spike.max_skipped_steps}); the run is diverging. "
                    + (f"Checkpoint saved in {ckpt.save}; " if ckpt.save else "")
                    + "lower --lr or check the data before resuming")
                result.stopped = "diverged"
                break
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
            if test_ds is not None and evaluating:
                result.test_loss = self._evaluate(test_ds, "the end of training for test data", "test")
        self.metrics.close()
        return result


def start_distributed(run: RunConfig, env: DistEnv | None = None) -> None:
    """torch.distributed through DeepSpeed (idempotent: a test may have started torch.distributed
    itself) and the run's TP/PP/DP groups, on every rank."""
    deepspeed_adapter.init_distributed(env or discover(), cpu_shm_comm=run.parallel.cpu_shm_comm)
    state.initialize_model_parallel(run.dims.tensor, run.dims.pipeline)


def build_run(run: RunConfig, vocab_size: int, faults: FaultInjection | None = None,
              env: DistEnv | None = None, start_time: float | None = None) -> Trainer:
    """Everything a run needs before its data: the entry point, the tests and the benchmarks all
    start here. `start_time` (time.time() at the program's start) is what --exit-duration-in-mins
    counts from (default: now)."""
    start_distributed(run, env)
    return Trainer(run, run.model_config(vocab_size), faults, start_time)
