"""Learning rate as a function of the iteration: linear warm-up, then cosine or linear decay to
--min-lr over --lr-decay-iters, then constant at --min-lr (Megatron's schedule).

It is stateless: a checkpoint's iteration number restores it exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"  # cosine | linear | constant

    def __call__(self, iteration: int) -> float:
        """The learning rate of the optimizer step that produces iteration `iteration` (1-based)."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * iteration / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if iteration >= self.decay_iters:
            return self.min_lr
        progress = (iteration - self.warmup_iters) / max(1, self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - progress
        elif self.style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"--lr-decay-style must be cosine, linear or constant, got {self.style!r}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)
