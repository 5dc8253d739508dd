"""Which optimizer steps to apply: non-finite steps are always skipped, loss spikes optionally.

A spike is a loss above `factor` x the mean of the last `window` applied steps' losses (a full
window is needed before anything counts as a spike, and skipped or spiky steps do not enter the
mean, so one spike does not hide the next).

The policy belongs to the trainer, which asks it before each step for an `UpdateGate` (a frozen
rule the optimizer applies to the step's global loss and gradient norm, identical on every rank,
so every rank skips the same steps) and after the step for its `Verdict` on the `StepResult`;
then it books the step. Nothing here calls back into the engine.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateGate:
    """Whether a step's update may be applied, decided from its loss and gradient norm alone."""
    spike_threshold: float | None = None  # skip a loss above this (None: spikes are not skipped)

    def allows(self, loss: float, grad_norm: float | None) -> bool:
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        return finite and (self.spike_threshold is None or loss <= self.spike_threshold)


@dataclass(frozen=True)
class Verdict:
    nonfinite: bool
    spike: bool
    skip: bool


class SpikePolicy:
    def __init__(self, factor: float, window: int, skip_spiky: bool, max_skipped_in_a_row: int):
        self.factor, self.skip_spiky, self.max_skipped = factor, skip_spiky, max_skipped_in_a_row
        self.recent: deque[float] = deque(maxlen=window)
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.nonfinite_total = 0
        self.spikes_total = 0

    def running_mean(self) -> float | None:
        if self.factor <= 0 or len(self.recent) < self.recent.maxlen:
            return None
        return sum(self.recent) / len(self.recent)

    def _threshold(self) -> float | None:
        mean = self.running_mean()
        return None if mean is None else self.factor * mean

    def gate(self) -> UpdateGate:
        """The rule for the next step's update."""
        return UpdateGate(self._threshold() if self.skip_spiky else None)

    def judge(self, loss: float, finite: bool) -> Verdict:
        """The verdict on a finished step of global batch loss `loss`; `finite`: its loss and
        gradient norm were finite (the engine's StepResult says)."""
        nonfinite = not finite
        threshold = self._threshold()
        spike = not nonfinite and threshold is not None and loss > threshold
        return Verdict(nonfinite, spike, nonfinite or (spike and self.skip_spiky))

    def record(self, loss: float, verdict: Verdict, applied: bool) -> None:
        """Books a finished step; `applied` is False also when DeepSpeed itself skipped it (fp16
        overflow, non-finite gradients under ZeRO)."""
        self.nonfinite_total += verdict.nonfinite
        self.spikes_total += verdict.spike
        if applied:
            self.skipped_in_a_row = 0
            if not verdict.spike:
                self.recent.append(loss)
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1

    def should_stop(self) -> bool:
        return self.max_skipped > 0 and self.skipped_in_a_row >= self.max_skipped

    def state_dict(self) -> dict:
        return dict(recent=list(self.recent), skipped_in_a_row=self.skipped_in_a_row,
                    skipped_total=self.skipped_total, nonfinite_total=self.nonfinite_total,
                    spikes_total=self.spikes_total)

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        for key in ("skipped_in_a_row", "skipped_total", "nonfinite_total", "spikes_total"):
            setattr(self, key, state[key])
