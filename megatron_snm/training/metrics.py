"""What the run reports: Megatron-LM's log lines (so users' parsers keep working), throughput
(tokens/s and model TFLOP/s per rank, with an ETA), and scalars for TensorBoard and, with
--wandb-project, Weights & Biases (the same scalars under the same names).

A callback of the trainer (training/callbacks.py). Every rank calls in; rank 0 prints and writes
the scalars (all ranks know the global loss, grad norm and timing, so nothing else needs gathering).
Which scalars: the loss and grad norm always (and `z-loss/z-loss` with --z-loss-weight: the z-loss
apart, the lm loss staying the cross entropy alone); the learning rate and loss scale unless
--no-log-*; validation perplexity, timers, batch size, memory, world size, throughput and the
optimizer's moments with their --log-* flags, every --tensorboard-log-interval steps.
"""
from __future__ import annotations

import math
import os
import time

import torch

from megatron_snm.config import RunConfig
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import describe
from megatron_snm.training.callbacks import Callback, StepReport


def model_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token, forward + backward, no recompute, from the model's description
    (model/describe.py): for GPT-2 6N + 12 L h s, with N the parameters multiplied per token
    (the blocks' matrices + the table used as the output layer)."""
    return describe(config).flops_per_token()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def memory_figures() -> dict[str, float]:
    """Megatron's memory scalars on GPU (the CUDA allocator's); on CPU the process's resident set."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {"mem-reserved-bytes": stats.get("reserved_bytes.all.current", 0),
                "mem-allocated-bytes": stats.get("allocated_bytes.all.current", 0),
                "mem-max-allocated-bytes": stats.get("allocated_bytes.all.peak", 0),
                "mem-allocated-count": stats.get("allocation.all.current", 0)}
    import psutil
    return {"mem-rss-bytes": psutil.Process().memory_info().rss}


class TrainingMetrics(Callback):
    def __init__(self, run: RunConfig, flops_per_token: float, rank: int):
        self.logging = log = run.logging
        self.is_writer = rank == 0
        self.world_size, self.train_iters = run.dims.world_size, run.batch.train_iters
        self.global_batch_size, self.seq_length = run.batch.global_batch_size, run.model.seq_length
        self.flops_per_token, self.log_interval = flops_per_token, log.log_interval
        self.writer = self.wandb = None
        if log.tensorboard_dir and self.is_writer:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log.tensorboard_dir)
        if log.wandb_project and self.is_writer:
            import wandb
            save_dir = log.wandb_save_dir or log.tensorboard_dir or "."
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=log.wandb_project, name=log.wandb_exp_name, dir=save_dir,
                                    config=run.effective())
        self._interval_start = time.perf_counter()
        self._losses: list[float] = []
        self._z_losses: list[float] = []
        self._iters_in_interval = 0

    def print(self, message: str) -> None:
        if self.is_writer:
            print(message, flush=True)

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        if not math.isfinite(value):
            return
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=iteration)

    def timer(self, name: str, seconds: float, iteration: int) -> None:
        """--log-timers-to-tensorboard: a phase's wall time (step, evaluation, save)."""
        if self.logging.log_timers_to_tensorboard:
            self.scalar(f"timers/{name}", seconds, iteration)

    def _step_scalars(self, report: StepReport) -> None:
        log, it, result = self.logging, report.iteration, report.result
        self.scalar("lm-loss-training/lm loss", result.loss, it)
        if result.z_loss is not None:
            self.scalar("z-loss/z-loss", result.z_loss, it)
        if result.grad_norm is not None:
            self.scalar("grad-norm/grad-norm", result.grad_norm, it)
        self.scalar("spikes/loss-spikes", report.spikes_total, it)
        self.scalar("spikes/grad-norm-spikes", report.grad_norm_spikes_total, it)
        if it % log.tensorboard_log_interval:
            return
        if log.log_learning_rate_to_tensorboard:
            self.scalar("learning-rate/learning-rate", report.lr, it)
        if log.log_loss_scale_to_tensorboard:
            self.scalar("loss-scale/loss-scale", report.loss_scale, it)
        if log.log_batch_size_to_tensorboard:
            self.scalar("batch-size/batch-size", self.global_batch_size, it)
        if log.log_world_size_to_tensorboard:
            self.scalar("world-size/world-size", self.world_size, it)
        if log.log_memory_to_tensorboard:
            for name, value in memory_figures().items():
                self.scalar(f"memory/{name}", value, it)
        self.timer("train-step-time", report.step_time, it)
        if log.log_throughput:
            tflops = self.global_batch_size * self.seq_length * self.flops_per_token / report.step_time / \
                self.world_size / 1e12
            self.scalar("throughput/throughput", tflops, it)
        for name, value in report.optimizer_states.items():
            self.scalar(f"optimizer/{name}", value, it)

    def post_step(self, report: StepReport) -> None:
        """The step's scalars, its skip message, and every --log-interval steps Megatron's line."""
        it, result, verdict = report.iteration, report.result, report.verdict
        if not result.applied:
            why = "non-finite loss or gradient norm" if verdict.nonfinite else "loss spike" if verdict.spike else \
                "DeepSpeed skipped the update (loss-scale overflow)"
            self.print(f" skipped iteration {it}: {why} (lm loss {result.loss:.6E}, grad norm {result.grad_norm})")
        self._iters_in_interval += 1
        if result.applied:
            self._losses.append(result.loss)
            if result.z_loss is not None:
                self._z_losses.append(result.z_loss)
        self._step_scalars(report)
        if it % self.log_interval and it != self.train_iters:
            return
        now = time.perf_counter()
        per_iter = (now - self._interval_start) / self._iters_in_interval
        tokens_per_s = self.global_batch_size * self.seq_length / per_iter
        tflops_per_rank = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
        z_loss = f" z loss: {sum(self._z_losses) / len(self._z_losses) if self._z_losses else float('nan'):.6E} |" \
            if result.z_loss is not None else ""
        self.print(
            f" iteration {it:8d}/{self.train_iters:8d} | consumed samples: {report.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {per_iter * 1000:.1f} | learning rate: {report.lr:.3E} |"
            f" global batch size: {self.global_batch_size:5d} | lm loss: {mean_loss:.6E} |{z_loss}"
            f" loss scale: {report.loss_scale:.1f} | grad norm: {norm} |"
            f" number of skipped iterations: {report.skipped_total:3d} |"
            f" number of nan iterations: {report.nonfinite_total:3d} | number of loss spikes: {report.spikes_total:3d} |"
            f" tokens per second: {tokens_per_s:.1f} | TFLOP/s per rank: {tflops_per_rank:.3f} |"
            + (f" throughput per GPU (TFLOP/s/GPU): {tflops_per_rank:.1f} |" if self.logging.log_throughput else "")
            + f" ETA: {_duration(per_iter * (self.train_iters - it))} |"
        )
        self.scalar("throughput/tokens-per-second", tokens_per_s, it)
        self.scalar("throughput/tflops-per-rank", tflops_per_rank, it)
        self._interval_start, self._losses, self._z_losses, self._iters_in_interval = now, [], [], 0

    def evaluation(self, where: str, loss: float, iteration: int, tag: str = "validation") -> None:
        ppl = math.exp(min(20.0, loss))
        line = f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        self.print("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self.scalar(f"lm-loss-{tag}/lm loss", loss, iteration)
        if self.logging.log_validation_ppl_to_tensorboard:
            self.scalar(f"lm-loss-{tag}/lm loss ppl", ppl, iteration)

    def stability(self, figures: dict[str, float], iteration: int) -> None:
        for name, value in figures.items():
            self.scalar(f"stability/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
