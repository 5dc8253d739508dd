"""A training run read back from what pretrain_gpt.py wrote, and the stability verdicts on it.

    history = RunHistory.read("runs/x/train.log", "runs/x/tensorboard")
    verdict = stability_verdict(history, SpikeRules())

The log (Megatron's lines, training/metrics.py) and the TensorBoard scalars are the trainer's
stable interface; nothing here imports the trainer. Per-step values come from TensorBoard
(`lm-loss-training/lm loss`, `grad-norm/grad-norm`, `z-loss/z-loss` with --z-loss-weight, `stability/...`
at the monitor interval);
TensorBoard never holds non-finite values, so the steps the trainer skipped as non-finite and its
validation lines are read from the log.

The rules, stated once (tools/stability_sweep.py and tools/plot_stability.py use them):
- loss spike: a step whose training loss exceeds `loss_factor` x the mean of the previous `window`
  finite losses (the previous ones only, as long as there are at least `min_history`: the early
  steps' spikes, where small models spike most, count too; the falling loss of early training
  keeps that mean above the current loss, so the fall itself is no spike);
- grad-norm spike: the same for the global gradient norm, with `grad_factor`;
- diverged: a non-finite loss or gradient norm at any step, the trainer stopping the run (exit
  status 3, too many skipped steps in a row), or the mean training loss of the last `window` steps
  above the first step's loss.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

_ITERATION = re.compile(r" iteration\s+(\d+)/\s*(\d+) \|.*?\| tokens per second: (\S+) \|")
_VALID = re.compile(r" validation loss at iteration (\d+) \| lm loss value: (\S+) \|")
_NONFINITE = re.compile(r" skipped iteration (\d+): non-finite loss or gradient norm")
_STOPPED = re.compile(r" stopping at iteration (\d+): ")


@dataclass(frozen=True)
class SpikeRules:
    loss_factor: float = 1.5
    grad_factor: float = 4.0
    window: int = 20
    min_history: int = 5


@dataclass
class RunHistory:
    train_iters: int | None = None
    loss: dict[int, float] = field(default_factory=dict)  # step -> training loss (nan where non-finite)
    grad_norm: dict[int, float] = field(default_factory=dict)
    z_loss: dict[int, float] = field(default_factory=dict)  # step -> z-loss (runs with --z-loss-weight)
    lr: dict[int, float] = field(default_factory=dict)
    valid_loss: dict[int, float] = field(default_factory=dict)
    stability: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> monitor figures
    tokens_per_s: list[float] = field(default_factory=list)  # one per log line
    nonfinite_steps: list[int] = field(default_factory=list)
    stopped_at: int | None = None

    @classmethod
    def read(cls, log_path: str, tensorboard_dir: str | None) -> "RunHistory":
        history = cls()
        with open(log_path, errors="replace") as fh:
            for line in fh:
                if m := _ITERATION.search(line):
                    history.train_iters = int(m.group(2))
                    history.tokens_per_s.append(float(m.group(3)))
                elif m := _VALID.search(line):
                    history.valid_loss[int(m.group(1))] = float(m.group(2))
                elif m := _NONFINITE.search(line):
                    history.nonfinite_steps.append(int(m.group(1)))
                elif m := _STOPPED.search(line):
                    history.stopped_at = int(m.group(1))
        if tensorboard_dir and os.path.isdir(tensorboard_dir):
            history._read_tensorboard(tensorboard_dir)
        for step in history.nonfinite_steps:
            history.loss[step] = history.grad_norm[step] = math.nan
        history.loss = dict(sorted(history.loss.items()))
        history.grad_norm = dict(sorted(history.grad_norm.items()))
        return history

    def _read_tensorboard(self, directory: str) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(directory, size_guidance={"scalars": 0})
        events.Reload()
        series = {"lm-loss-training/lm loss": self.loss, "grad-norm/grad-norm": self.grad_norm,
                  "learning-rate/learning-rate": self.lr, "z-loss/z-loss": self.z_loss}
        for tag in events.Tags()["scalars"]:
            if tag in series:
                series[tag].update((e.step, e.value) for e in events.Scalars(tag))
            elif tag.startswith("stability/"):
                name = tag[len("stability/"):]
                for e in events.Scalars(tag):
                    self.stability.setdefault(e.step, {})[name] = e.value
        self.stability = dict(sorted(self.stability.items()))


def run_directories(directories: list[str]) -> list[str]:
    """The runs among sweep output directories (DIR/runs/NAME with a train.log, in name order) and run
    directories (a train.log of their own); ValueError for a directory that is neither."""
    runs = []
    for directory in directories:
        if os.path.isfile(os.path.join(directory, "train.log")):
            runs.append(directory)
        elif os.path.isdir(os.path.join(directory, "runs")):
            names = sorted(os.listdir(os.path.join(directory, "runs")))
            runs += [os.path.join(directory, "runs", n) for n in names
                     if os.path.isfile(os.path.join(directory, "runs", n, "train.log"))]
        else:
            raise ValueError(f"{directory}: no train.log and no runs/ directory in it")
    return runs


def spikes(series: dict[int, float], factor: float, window: int, min_history: int = 5) -> list[int]:
    """Steps whose value exceeds factor x the mean of the previous `window` (at least `min_history`)
    finite values."""
    recent: list[float] = []
    found = []
    for step, value in series.items():
        if not math.isfinite(value):
            continue
        if len(recent) >= min_history and value > factor * sum(recent) / len(recent):
            found.append(step)
        recent = (recent + [value])[-window:]
    return found


def _ppl(loss: float | None) -> float | None:
    return None if loss is None or not math.isfinite(loss) else math.exp(min(loss, 50.0))


def gradient_attribution(figures: dict[str, float]) -> dict:
    """Which part of the model a captured step's gradient came from: the squares of the monitor's
    per-module gradient norms split the global norm squared between the embedding, the blocks and
    the final LayerNorm; the source is the largest of the three (each share is in `shares`)."""
    embedding = figures.get("grad_norm/embedding", 0.0) ** 2
    final = figures.get("grad_norm/final_norm", 0.0) ** 2
    blocks = {k[len("grad_norm/"):]: v for k, v in figures.items() if k.startswith("grad_norm/layer_")}
    parts = {"embedding": embedding, "blocks": sum(v * v for v in blocks.values()), "final_norm": final}
    total = sum(parts.values())
    return dict(source=max(parts, key=parts.get) if total else None,
                embedding_share=embedding / total if total else None,
                final_norm_share=final / total if total else None,
                largest_block=max(blocks, key=blocks.get) if blocks else None)


def stability_verdict(history: RunHistory, rules: SpikeRules, exit_status: int | None = None) -> dict:
    losses = [v for v in history.loss.values() if math.isfinite(v)]
    nonfinite = bool(history.nonfinite_steps) or any(not math.isfinite(v) for v in history.valid_loss.values())
    first = losses[0] if losses else None
    last = losses[-rules.window:]
    final_loss = sum(last) / len(last) if last else None
    stopped = history.stopped_at is not None or exit_status == 3
    reasons = [r for r, hit in (("non-finite loss or gradient norm", nonfinite), ("stopped by the trainer", stopped),
                                ("final loss above the first step's", final_loss is not None and first is not None
                                 and final_loss > first)) if hit]
    finite_valid = {k: v for k, v in history.valid_loss.items() if math.isfinite(v)}
    best_valid = min(finite_valid.values()) if finite_valid else None
    completed = history.train_iters is not None and history.train_iters in history.valid_loss and not stopped
    final_valid = history.valid_loss[history.train_iters] if completed else None

    norms = {k: v for k, v in history.grad_norm.items() if math.isfinite(v)}
    max_step = max(norms, key=norms.get) if norms else None
    captured = {s: f for s, f in history.stability.items() if s in norms and "grad_norm/embedding" in f}
    # The captured step with the largest global norm (the monitor runs only every N steps).
    at = max(captured, key=lambda s: norms[s]) if captured else None
    attribution = gradient_attribution(captured[at]) if at is not None else dict(
        source=None, embedding_share=None, final_norm_share=None, largest_block=None)
    shares = [gradient_attribution(f)["embedding_share"] for f in captured.values()]
    shares = [s for s in shares if s is not None]
    speed = history.tokens_per_s[1:] or history.tokens_per_s  # the first interval includes start-up
    loss_spikes = spikes(history.loss, rules.loss_factor, rules.window, rules.min_history)
    grad_spikes = spikes(history.grad_norm, rules.grad_factor, rules.window, rules.min_history)
    return dict(
        steps=len(history.loss), diverged=bool(reasons), diverged_reason="; ".join(reasons) or None,
        loss_spikes=len(loss_spikes), loss_spike_steps=loss_spikes,
        grad_norm_spikes=len(grad_spikes), grad_norm_spike_steps=grad_spikes,
        first_loss=first, final_train_loss=final_loss,
        max_grad_norm=norms[max_step] if max_step is not None else None, max_grad_norm_step=max_step,
        max_grad_norm_source=attribution["source"], max_captured_grad_norm_step=at,
        max_captured_grad_norm=norms[at] if at is not None else None,
        max_captured_embedding_grad_share=attribution["embedding_share"],
        max_captured_final_norm_grad_share=attribution["final_norm_share"],
        max_captured_largest_block=attribution["largest_block"],
        mean_embedding_grad_share=sum(shares) / len(shares) if shares else None,
        best_valid_loss=best_valid, best_valid_ppl=_ppl(best_valid),
        final_valid_loss=final_valid, final_valid_ppl=_ppl(final_valid),
        tokens_per_s=sorted(speed)[len(speed) // 2] if speed else None,
    )
