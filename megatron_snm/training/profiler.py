"""--profile: a torch.profiler trace of steps --profile-step-start + 1 .. --profile-step-end.

Megatron-LM starts profiling once --profile-step-start steps are done and stops once
--profile-step-end are (so 4 and 6 profile steps 5 and 6), with nsys, or with PyTorch's profiler
under --use-pytorch-profiler, writing the trace into --tensorboard-dir; here it is always PyTorch's (CPU activities, and CUDA's
where there is a GPU), on the global ranks of --profile-ranks. The trace is
`<tensorboard-dir>/rank<R>.<time>.pt.trace.json`: TensorBoard's profiler plugin and
chrome://tracing (or Perfetto) read it.
"""
from __future__ import annotations

import torch

from megatron_snm.training.callbacks import Callback, StepReport


class StepProfiler(Callback):
    def __init__(self, directory: str, start: int, end: int, rank: int):
        self.directory, self.start, self.end, self.rank = directory, start, end, rank
        self._profile: torch.profiler.profile | None = None

    def pre_step(self, iteration: int) -> None:
        if iteration == self.start + 1 and self._profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(
                activities=activities, record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.directory, worker_name=f"rank{self.rank}"))
            self._profile.start()

    def post_step(self, report: StepReport) -> None:
        if report.iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stops and writes the trace (also when the run ends before --profile-step-end)."""
        if self._profile is not None:
            self._profile.stop()
            self._profile = None
