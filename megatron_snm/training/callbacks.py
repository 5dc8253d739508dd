"""What the trainer tells the observers of a run after each step, and the stability monitor's.

A callback sees every step twice: `pre_step(iteration)` before the engine runs it, `post_step(report)`
after the trainer has judged it. Callbacks observe and report; they decide nothing about the
run (the trainer's spike policy does). `state_dict` / `load_state_dict` for what they must keep
across a resume (in the style of OLMo-core's callbacks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_snm.parallel import state
from megatron_snm.training.engine import StepResult
from megatron_snm.training.monitor import StabilityMonitor
from megatron_snm.training.spikes import Verdict
from megatron_snm.training.update_ratio import UpdateRatio


@dataclass(frozen=True)
class StepReport:
    iteration: int
    consumed_samples: int
    lr: float
    result: StepResult
    verdict: Verdict
    loss_scale: float
    skipped_total: int  # the spike policy's counts so far
    nonfinite_total: int
    spikes_total: int
    spike_mean: float | None  # the running mean a spike was measured against
    grad_norm_spikes_total: int = 0
    step_time: float = 0.0  # seconds the engine took for the step
    optimizer_states: dict[str, float] = field(default_factory=dict)  # --log-optimizer-states-to-tensorboard


class Callback:
    def pre_step(self, iteration: int) -> None:
        pass

    def post_step(self, report: StepReport) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _listing(figures: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in figures.items())


class StabilityCallback(Callback):
    """Runs the stability monitor every `interval` steps (0: never) and on the step right after a
    loss spike, and reports its figures with the step's update/weight ratios (training/update_ratio.py).
    The monitor costs a few hooks per layer while it captures, the ratios a copy of the fp32 weights;
    a spike is known only once its step is done, so `interval` 1 captures the spiky step itself."""

    def __init__(self, model, metrics, interval: int, spike_factor: float):
        self.monitor = StabilityMonitor(model)
        self.updates = UpdateRatio(model)
        self.metrics, self.interval, self.spike_factor = metrics, interval, spike_factor
        self.after_spike: int | None = None  # the iteration of the spike the next step follows
        self.capturing = False
        self.last_figures: dict[str, float] = {}  # the latest step's figures ({}: not captured), for the trainer

    def pre_step(self, iteration: int) -> None:
        self.capturing = self.after_spike is not None or (self.interval > 0 and iteration % self.interval == 0)
        if self.capturing:
            self.monitor.start()
            self.updates.snapshot()

    def figures(self) -> dict[str, float]:
        """The figures of the whole model (collective): each pipeline stage measures its own layers."""
        figures = {**self.monitor.figures(), **self.updates.figures()}  # collective over TP (and DP under ZeRO)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (state.get_data_parallel_rank(), state.get_tensor_model_parallel_rank(),
                                          figures))
        merged = {}
        for dp_rank, tp_rank, figs in everyone:
            if dp_rank == 0 and tp_rank == 0:
                merged.update(figs)
        return dict(sorted(merged.items()))

    def post_step(self, report: StepReport) -> None:
        figures = {}
        if self.capturing:
            self.monitor.stop()
            figures = self.figures()
            self.metrics.stability(figures, report.iteration)
        self.last_figures = figures
        it = report.iteration
        if report.verdict.spike:
            self.metrics.print(
                f" loss spike at iteration {it}: lm loss {report.result.loss:.6E} > {self.spike_factor} x running "
                f"mean {report.spike_mean:.6E}" + (f"; stability monitor: {_listing(figures)}" if self.capturing
                                                   else "; stability monitor figures follow at the next step"))
        elif self.after_spike is not None:
            self.metrics.print(f" stability monitor at iteration {it}, the step after the loss spike at iteration "
                               f"{self.after_spike}: {_listing(figures)}")
        self.after_spike = it if report.verdict.spike else None
