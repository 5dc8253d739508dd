"""--spike-warning SIGNAL:FACTOR: a signal that tends to precede loss spikes (warning_signals.py;
tools/early_warning.py measures which) has crossed FACTOR x its running mean, so the trainer saves a
checkpoint at once and a rollback finds one close to the spike rather than up to --save-interval
steps before it.

    warning = SpikeWarning("grad_norm", 4.0, window=20)
    why = warning.observe(grad_norm, figures)   # after each step: a sentence when it fires, else None

The trainer owns it and decides (the save); the values come from the step's result (the gradient
norm, every step) and the stability monitor's figures of the step (only on the steps it captures:
every --log-stability-interval and the step after a spike). Its running mean is kept in checkpoints,
so a resumed or rolled-back run goes on from the same history.
"""
from __future__ import annotations

from megatron_snm.warning_signals import GRAD_NORM, RunningThreshold, monitor_signal


class SpikeWarning:
    def __init__(self, signal: str, factor: float, window: int):
        self.signal, self.factor = signal, factor
        self.threshold = RunningThreshold(factor, window)

    def observe(self, grad_norm: float | None, figures: dict[str, float]) -> str | None:
        """A finished step's gradient norm and monitor figures ({} when it was not captured): why the
        warning fires, or None."""
        value = grad_norm if self.signal == GRAD_NORM else monitor_signal(figures, self.signal)
        if value is None:
            return None
        mean = self.threshold.mean()
        if not self.threshold.observe(value):
            return None
        return f"{self.signal} {value:.4g} > {self.factor:g} x its running mean {mean:.4g}"

    def state_dict(self) -> dict:
        return dict(self.threshold.state_dict(), signal=self.signal)

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's history, if it is of the same signal (a resumed run may watch another)."""
        if state.get("signal") == self.signal:
            self.threshold.load_state_dict(state)
