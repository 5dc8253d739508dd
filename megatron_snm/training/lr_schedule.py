"""Learning rate as a function of training progress (Megatron's OptimizerParamScheduler, stateless).

Progress is counted in samples, or in tokens when the run gives --lr-warmup-tokens or
--lr-decay-tokens (Megatron-DeepSpeed); config/resolve.py turns every warm-up and decay flag
(iterations, samples, tokens, --lr-warmup-fraction) into the two lengths here. Linear warm-up from
--lr-warmup-init to --lr, then cosine, linear or inverse-square-root decay to --min-lr, then
constant at --min-lr. A checkpoint's iteration number restores it exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megatron_snm.config.flags import LR_DECAY_STYLES as STYLES


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup: float  # the warm-up's length, in the schedule's unit (samples or tokens)
    decay: float  # where the decay ends, in the same unit
    style: str = "cosine"
    init_lr: float = 0.0  # where the warm-up starts

    def __call__(self, progress: float) -> float:
        """The learning rate of the optimizer step that brings training to `progress` (the samples or
        tokens consumed once the step is done; iteration i of a run with global batch B: i * B)."""
        if self.warmup > 0 and progress <= self.warmup:
            return self.init_lr + (self.max_lr - self.init_lr) * progress / self.warmup
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            return max(self.min_lr, self.max_lr * math.sqrt(max(self.warmup, 1)) / math.sqrt(max(progress, 1)))
        if progress >= self.decay:
            return self.min_lr
        ratio = (progress - self.warmup) / (self.decay - self.warmup)
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        else:
            raise ValueError(f"--lr-decay-style must be one of {STYLES}, got {self.style!r}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


def lr_schedule(run) -> LRSchedule:
    """The schedule of a resolved run (config/resolve.py's RunConfig: its --lr flags and lengths)."""
    optim, lengths = run.optim, run.lr_schedule
    return LRSchedule(optim.lr, optim.min_lr, lengths.warmup, lengths.decay, optim.lr_decay_style,
                      optim.lr_warmup_init)


def decoupled_lr_schedule(schedule: LRSchedule, run) -> LRSchedule | None:
    """--decoupled-lr: the input embedding's and output layer's schedule, the same shape with its own
    peak and floor (Megatron: the floor stays --min-lr unless --decoupled-min-lr is given)."""
    optim = run.optim
    if optim.decoupled_lr is None:
        return None
    floor = optim.decoupled_min_lr if optim.decoupled_min_lr is not None else optim.min_lr
    return dataclasses.replace(schedule, max_lr=optim.decoupled_lr, min_lr=floor)
