"""Which optimizer steps to apply: non-finite steps are always skipped, loss spikes optionally.

A loss spike is a loss above `factor` x the mean of the last `window` applied steps' losses, or
(with `zscore` > 0, OLMo-core's rule) above that mean + `zscore` x their standard deviation. A
gradient-norm spike is a norm above `grad_factor` x the mean of the last `window` norms; it is
counted and logged, not skipped (under ZeRO the optimizer does not see the norm before it steps).
A full window is needed before anything counts as a spike, and skipped or spiky steps do not
enter the means, so one spike does not hide the next. The run has diverged after
`max_skipped_in_a_row` skipped steps or `max_spiky_in_a_row` loss spikes in a row.

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
    grad_norm_spike: bool = False


def _mean_std(values) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class SpikePolicy:
    def __init__(self, factor: float, window: int, skip_spiky: bool, max_skipped_in_a_row: int,
                 zscore: float = 0.0, grad_factor: float = 0.0, max_spiky_in_a_row: int = 0):
        self.factor, self.skip_spiky, self.max_skipped = factor, skip_spiky, max_skipped_in_a_row
        self.zscore, self.grad_factor, self.max_spiky = zscore, grad_factor, max_spiky_in_a_row
        self.recent: deque[float] = deque(maxlen=window)
        self.recent_norms: deque[float] = deque(maxlen=window)
        self.skipped_in_a_row = 0
        self.spiky_in_a_row = 0
        self.skipped_total = 0
        self.nonfinite_total = 0
        self.spikes_total = 0
        self.grad_norm_spikes_total = 0

    def running_mean(self) -> float | None:
        if (self.factor <= 0 and self.zscore <= 0) or len(self.recent) < self.recent.maxlen:
            return None
        return sum(self.recent) / len(self.recent)

    def _threshold(self) -> float | None:
        """The loss above which a step is a spike (None: no full window yet, or no rule)."""
        if self.running_mean() is None:
            return None
        mean, std = _mean_std(self.recent)
        rules = ([self.factor * mean] if self.factor > 0 else []) + ([mean + self.zscore * std] if self.zscore > 0 else [])
        return min(rules)

    def gate(self) -> UpdateGate:
        """The rule for the next step's update."""
        return UpdateGate(self._threshold() if self.skip_spiky else None)

    def judge(self, loss: float, finite: bool, grad_norm: float | None = None) -> Verdict:
        """The verdict on a finished step of global batch loss `loss`; `finite`: its loss and
        gradient norm were finite (the engine's StepResult says)."""
        nonfinite = not finite
        threshold = self._threshold()
        spike = not nonfinite and threshold is not None and loss > threshold
        full = len(self.recent_norms) == self.recent_norms.maxlen
        grad_spike = (not nonfinite and grad_norm is not None and self.grad_factor > 0 and full
                      and grad_norm > self.grad_factor * sum(self.recent_norms) / len(self.recent_norms))
        return Verdict(nonfinite, spike, nonfinite or (spike and self.skip_spiky), grad_spike)

    def record(self, loss: float, verdict: Verdict, applied: bool, grad_norm: float | None = None) -> None:
        """Books a finished step; `applied` is False also when DeepSpeed itself skipped it (fp16
        overflow, non-finite gradients under ZeRO)."""
        self.nonfinite_total += verdict.nonfinite
        self.spikes_total += verdict.spike
        self.grad_norm_spikes_total += verdict.grad_norm_spike
        self.spiky_in_a_row = self.spiky_in_a_row + 1 if verdict.spike else 0
        if applied:
            self.skipped_in_a_row = 0
            if not verdict.spike:
                self.recent.append(loss)
            if grad_norm is not None and not verdict.grad_norm_spike:
                self.recent_norms.append(grad_norm)
        else:
            self.skipped_in_a_row += 1
            self.skipped_total += 1

    def diverged(self) -> bool:
        return (self.max_skipped > 0 and self.skipped_in_a_row >= self.max_skipped) or \
            (self.max_spiky > 0 and self.spiky_in_a_row >= self.max_spiky)

    def divergence(self) -> str:
        """Why the run has diverged, for the log."""
        if self.max_skipped > 0 and self.skipped_in_a_row >= self.max_skipped:
            return f"{self.skipped_in_a_row} steps in a row were skipped (--max-skipped-steps {self.max_skipped})"
        return f"{self.spiky_in_a_row} loss spikes in a row (--max-spiky-steps {self.max_spiky})"

    _COUNTERS = ("skipped_in_a_row", "spiky_in_a_row", "skipped_total", "nonfinite_total", "spikes_total",
                 "grad_norm_spikes_total")

    def state_dict(self) -> dict:
        return dict(recent=list(self.recent), recent_norms=list(self.recent_norms),
                    **{key: getattr(self, key) for key in self._COUNTERS})

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.recent_norms.clear()
        self.recent_norms.extend(state.get("recent_norms", []))
        for key in self._COUNTERS:
            setattr(self, key, state.get(key, 0))
