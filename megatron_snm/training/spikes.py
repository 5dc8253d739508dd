"""Which optimizer steps to apply: non-finite steps are always skipped, loss spikes optionally.

A spike is a loss above `factor` x the mean of the last `window` applied steps' losses (a full
window is needed before anything counts as a spike, and skipped or spiky steps do not enter the
mean, so one spike does not hide the next). The verdict is made from the global batch loss and
the global gradient norm, identical on every rank, so every rank skips the same steps.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    loss: float
    grad_norm: float | None
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

    def judge(self, loss: float, grad_norm: float | None) -> Verdict:
        nonfinite = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        mean = self.running_mean()
        spike = not nonfinite and mean is not None and loss > self.factor * mean
        return Verdict(loss, grad_norm, nonfinite, spike, nonfinite or (spike and self.skip_spiky))

    def record(self, verdict: Verdict, applied: bool) -> None:
        """Books a finished step; `applied` is False also when DeepSpeed itself skipped it (fp16
        overflow, non-finite gradients under ZeRO)."""
        self.nonfinite_total += verdict.nonfinite
        self.spikes_total += verdict.spike
        if applied:
            self.skipped_in_a_row = 0
            if not verdict.spike:
                self.recent.append(verdict.loss)
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
