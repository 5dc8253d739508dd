"""The signals that may announce a loss spike, and the rule for when one has crossed its threshold,
stated once for the early-warning study (analysis/early_warning.py) and for --spike-warning (the
trainer), so what the study measured is what a run acts on.

A signal is the global gradient norm (every step) or the largest of a family of the stability
monitor's figures (the steps it captures: --log-stability-interval, and the step after a spike):

    grad_norm             the global gradient norm before clipping
    update_rms_ratio      max over modules of RMS(update) / RMS(weights) (training/update_ratio.py)
    max_attention_logit   max over layers of the largest attention logit
    log_z                 log_z/mean: the mean log of the output softmax's normaliser
    residual_std          max over the embedding and blocks of the residual stream's std
    ln_amplification      max over the norms of |grad in| / |grad out|

    crossing = RunningThreshold(factor=4, window=20)
    crossing.observe(value)   # True when value > 4 x the mean of the previous 20 observations (at least 5)
"""
from __future__ import annotations

import math
from collections import deque

GRAD_NORM = "grad_norm"
# signal -> the monitor figure it is, or (ending in "/") the family of figures it is the largest of
MONITOR_SIGNALS = {
    "update_rms_ratio": "update_rms_ratio/",
    "max_attention_logit": "max_attention_logit/",
    "log_z": "log_z/mean",
    "residual_std": "residual_std/",
    "ln_amplification": "ln_amplification/",
}
SIGNALS = (GRAD_NORM, *MONITOR_SIGNALS)


def monitor_signal(figures: dict[str, float], signal: str) -> float | None:
    """The value of a monitor signal among a captured step's figures (None: not among them)."""
    name = MONITOR_SIGNALS[signal]
    values = [v for k, v in figures.items() if (k.startswith(name) if name.endswith("/") else k == name)
              and math.isfinite(v)]
    return max(values) if values else None


class RunningThreshold:
    """A crossing: a value above `factor` x the mean of the previous `window` finite observations,
    once there are at least `min_history` of them (run_history.spikes' rule for loss spikes). Every
    finite observation enters the mean, crossings included."""

    def __init__(self, factor: float, window: int, min_history: int = 5):
        self.factor, self.min_history = factor, min_history
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        crossed = len(self.recent) >= self.min_history and value > self.factor * sum(self.recent) / len(self.recent)
        self.recent.append(value)
        return crossed

    def mean(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def state_dict(self) -> dict:
        return dict(recent=list(self.recent))

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
