"""Between steps: Megatron's --manual-gc and --empty-unused-memory-level.

Python's automatic garbage collector runs whenever allocation counts cross its thresholds, so each
rank pauses at its own moment and a synchronous collective waits for the slowest; --manual-gc turns
it off and collects at the same points on every rank instead (Megatron's rule: at the start, every
--manual-gc-interval steps, and before and after each evaluation unless --no-manual-gc-eval).
--empty-unused-memory-level hands the CUDA caching allocator's unused blocks back after each step
and evaluation (less fragmentation, at the price of new allocations).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from megatron_snm.config.flags import BatchArgs


class Housekeeping:
    def __init__(self, batch: BatchArgs):
        self.manual_gc, self.gc_interval, self.gc_eval = batch.manual_gc, batch.manual_gc_interval, \
            batch.manual_gc_eval
        self.empty_cache = batch.empty_unused_memory_level > 0 and torch.cuda.is_available()
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.manual_gc:
            gc.disable()
            gc.collect()

    def after_step(self, iteration: int) -> None:
        if self.empty_cache:
            torch.cuda.empty_cache()
        if self.manual_gc and self.gc_interval and iteration % self.gc_interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def evaluation(self):
        if self.manual_gc and self.gc_eval:
            gc.collect()
        try:
            yield
        finally:
            if self.manual_gc and self.gc_eval:
                gc.collect()
            if self.empty_cache:
                torch.cuda.empty_cache()

    def close(self) -> None:
        """The collector back as it was (a process may run several trainings, as the tests do)."""
        if self.manual_gc and self._was_enabled:
            gc.enable()
