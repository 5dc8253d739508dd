"""What the run reports: Megatron-LM's log lines (so users' parsers keep working), throughput
(tokens/s and model TFLOP/s per rank, with an ETA), and TensorBoard scalars.

A callback of the trainer (training/callbacks.py). Every rank calls in; rank 0 prints and writes
TensorBoard (all ranks know the global loss, grad norm and timing, so nothing else needs gathering).
"""
from __future__ import annotations

import math
import time

from megatron_snm.model.config import GPTConfig
from megatron_snm.training.callbacks import Callback, StepReport


def model_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token, forward + backward, no recompute: 6N + 12 L h s, with N the
    parameters touched per token (blocks + embedding table used as the output layer)."""
    h, L, s, f = config.hidden_size, config.num_layers, config.seq_length, config.ffn_hidden_size
    per_block = 4 * h * h + 2 * h * f  # QKV + output projection, two FFN matrices
    n = L * per_block + config.padded_vocab_size * h
    return 6.0 * n + 12.0 * L * h * s


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainingMetrics(Callback):
    def __init__(self, *, rank: int, world_size: int, train_iters: int, global_batch_size: int, seq_length: int,
                 flops_per_token: float, log_interval: int, tensorboard_dir: str | None):
        self.is_writer = rank == 0
        self.world_size, self.train_iters = world_size, train_iters
        self.global_batch_size, self.seq_length = global_batch_size, seq_length
        self.flops_per_token, self.log_interval = flops_per_token, log_interval
        self.writer = None
        if tensorboard_dir and self.is_writer:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self._interval_start = time.perf_counter()
        self._losses: list[float] = []
        self._iters_in_interval = 0

    def print(self, message: str) -> None:
        if self.is_writer:
            print(message, flush=True)

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        if self.writer is not None and math.isfinite(value):
            self.writer.add_scalar(tag, value, iteration)

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
        self.scalar("lm-loss-training/lm loss", result.loss, it)
        self.scalar("learning-rate/learning-rate", report.lr, it)
        if result.grad_norm is not None:
            self.scalar("grad-norm/grad-norm", result.grad_norm, it)
        self.scalar("spikes/loss-spikes", report.spikes_total, it)
        self.scalar("spikes/grad-norm-spikes", report.grad_norm_spikes_total, it)
        if it % self.log_interval and it != self.train_iters:
            return
        now = time.perf_counter()
        per_iter = (now - self._interval_start) / self._iters_in_interval
        tokens_per_s = self.global_batch_size * self.seq_length / per_iter
        tflops_per_rank = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        norm = f"{result.grad_norm:.3f}" if result.grad_norm is not None else "n/a"
        self.print(
            f" iteration {it:8d}/{self.train_iters:8d} | consumed samples: {report.consumed_samples:12d} |"
            f" elapsed time per iteration (ms): {per_iter * 1000:.1f} | learning rate: {report.lr:.3E} |"
            f" global batch size: {self.global_batch_size:5d} | lm loss: {mean_loss:.6E} |"
            f" loss scale: {report.loss_scale:.1f} | grad norm: {norm} |"
            f" number of skipped iterations: {report.skipped_total:3d} |"
            f" number of nan iterations: {report.nonfinite_total:3d} | number of loss spikes: {report.spikes_total:3d} |"
            f" tokens per second: {tokens_per_s:.1f} | TFLOP/s per rank: {tflops_per_rank:.3f} |"
            f" ETA: {_duration(per_iter * (self.train_iters - it))} |"
        )
        self.scalar("throughput/tokens-per-second", tokens_per_s, it)
        self.scalar("throughput/tflops-per-rank", tflops_per_rank, it)
        self._interval_start, self._losses, self._iters_in_interval = now, [], 0

    def evaluation(self, where: str, loss: float, iteration: int, tag: str = "validation") -> None:
        ppl = math.exp(min(20.0, loss))
        line = f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
        self.print("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        self.scalar(f"lm-loss-{tag}/lm loss", loss, iteration)
        self.scalar(f"lm-loss-{tag}/lm loss ppl", ppl, iteration)

    def stability(self, figures: dict[str, float], iteration: int) -> None:
        for name, value in figures.items():
            self.scalar(f"stability/{name}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
