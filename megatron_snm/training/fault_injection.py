"""Test hooks: faults a test can inject into a real run. Off unless their environment variable is set.

    MEGATRON_SNM_TEST_INJECT_LOSS="4:nan,8:50"   multiply the training loss of iteration 4 by NaN and of
                                                 iteration 8 by 50 (a non-finite step, a loss spike)
    MEGATRON_SNM_TEST_SLEEP_IN_SAVE="6:120"      sleep 120 s inside the save of iteration 6, after the
                                                 files are written and before they are published, so a
                                                 test can kill the run mid-save

`--inject-divergence-at ITER,...` (a documented flag, for rollback drills) adds NaN factors the
same way. Each factor fires once: after a rollback or a resume it does not fire again (the
trainer records the fired iterations in its checkpoints). This is the only place production code
reads such hooks: the trainer arms the loss factor of each iteration, the engine's loss function
applies it, and the checkpoint writer asks for the pause.
"""
from __future__ import annotations

import os
import time

INJECT_LOSS_ENV = "MEGATRON_SNM_TEST_INJECT_LOSS"
SLEEP_IN_SAVE_ENV = "MEGATRON_SNM_TEST_SLEEP_IN_SAVE"


def _pairs(spec: str) -> dict[int, float]:
    return {int(it): float(value) for it, value in (item.split(":") for item in spec.split(",") if item)}


class FaultInjection:
    def __init__(self, loss_factors: dict[int, float] | None = None, save_pauses: dict[int, float] | None = None):
        self.loss_factors, self.save_pauses = loss_factors or {}, save_pauses or {}
        self.fired: list[int] = []
        self._factor: float | None = None

    @classmethod
    def from_env(cls, divergences: list[int] = ()) -> "FaultInjection":
        factors = {**_pairs(os.environ.get(INJECT_LOSS_ENV, "")), **{it: float("nan") for it in divergences}}
        return cls(factors, _pairs(os.environ.get(SLEEP_IN_SAVE_ENV, "")))

    def forget(self, fired: list[int]) -> None:
        """Iterations whose faults already fired (read back from a checkpoint)."""
        for it in fired:
            self.loss_factors.pop(it, None)
        self.fired = sorted(set(self.fired) | set(fired))

    def arm(self, iteration: int | None) -> None:
        """The training step about to run (None: evaluation, never faulted)."""
        self._factor = self.loss_factors.pop(iteration, None) if iteration is not None else None
        if self._factor is not None:
            self.fired.append(iteration)

    def scale_loss(self, loss):
        return loss if self._factor is None else loss * self._factor

    def pause_in_save(self, iteration: int) -> None:
        if iteration in self.save_pauses:
            time.sleep(self.save_pauses[iteration])
