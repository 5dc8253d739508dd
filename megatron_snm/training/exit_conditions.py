"""When a run stops before its last iteration, and which exit status says so.

    --exit-interval N           after an iteration divisible by N: save, exit 0 (EXIT_OK)
    --exit-duration-in-mins M   once M minutes have passed since the run started: save, exit 4
    --exit-signal-handler       on SIGTERM or SIGUSR1 (what SLURM sends before a job's time limit,
                                with `#SBATCH --signal=USR1@SECONDS`): finish the step, save, exit 4

Exit status 4 (EXIT_RESUMABLE) means "saved and stopped early: run the same command again with
--load to continue"; examples/pretrain_gpt_slurm.sbatch requeues the job on it. The handler only
records the signal, so a second signal during the save changes nothing (the save itself is
crash-safe in any case: checkpoint/save_load.py). Every rank must stop at the same iteration, so
the decision is one all-reduce (MAX) of each rank's view after every step.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_RESUMABLE = 4
EXIT_CODES = {None: EXIT_OK, "interval": EXIT_OK, "diverged": EXIT_DIVERGED, "signal": EXIT_RESUMABLE,
              "duration": EXIT_RESUMABLE}
EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitConditions:
    def __init__(self, interval: int | None, duration_in_mins: float | None, handle_signals: bool,
                 start_time: float | None = None):
        self.interval, self.handle_signals = interval, handle_signals
        self.deadline = None if duration_in_mins is None else \
            (start_time if start_time is not None else time.time()) + 60.0 * duration_in_mins
        self.received: int | None = None  # the signal number, once one arrives
        self._previous: dict = {}

    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "ExitConditions":
        if self.handle_signals:
            self._previous = {s: signal.signal(s, self._on_signal) for s in EXIT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def check(self, iteration: int, device: torch.device) -> str | None:
        """Why the run stops after `iteration`, the same on every rank: "signal", "duration",
        "interval", or None. Collective when a duration or the signal handler is set."""
        if self.deadline is not None or self.handle_signals:
            flags = torch.tensor([float(self.received is not None),
                                  float(self.deadline is not None and time.time() >= self.deadline)], device=device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            if flags[0]:
                return "signal"
            if flags[1]:
                return "duration"
        if self.interval and iteration % self.interval == 0:
            return "interval"
        return None
