"""Faults injected into a real run: none unless given.

    FaultInjection(loss_factors={4: nan, 8: 50.0},   multiply the training loss of iteration 4 by NaN
                   save_pauses={6: 120.0})           and of 8 by 50 (a non-finite step, a loss spike);
                                                     sleep 120 s inside the save of iteration 6, after
                                                     the files are written and before they are published

`--inject-divergence-at ITER,...` (a documented flag, for rollback drills) adds NaN factors; the test
harness (tests/training_harness.py) builds the rest and hands it to `build_run`. Each factor fires
once: after a rollback or a resume it does not fire again (the trainer records the fired iterations
in its checkpoints). The trainer arms the loss factor of each iteration, the engine's loss function
applies it, and the checkpoint's publication waits for the pause.
"""
from __future__ import annotations

import time


class FaultInjection:
    def __init__(self, loss_factors: dict[int, float] | None = None, save_pauses: dict[int, float] | None = None):
        self.loss_factors, self.save_pauses = loss_factors or {}, save_pauses or {}
        self.fired: list[int] = []
        self._factor: float | None = None

    def add_loss_factors(self, factors: dict[int, float]) -> None:
        self.loss_factors.update(factors)

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
