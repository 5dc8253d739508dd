"""Early warning: which monitored signal crosses a threshold before a loss spike, how long before,
how many spikes it misses and how often it fires without one.

    runs = read_runs(["sweeps/study"])                       # every DIR/runs/NAME (or a run directory)
    table = early_warning(runs, SpikeRules(), Settings())    # one row per signal and threshold rule

Loss spikes are run_history's (a finite loss above SpikeRules.loss_factor x the mean of the
previous window; non-finite steps are divergences, not counted here). Signals and the crossing rule are megatron_snm/warning_signals.py's, the ones
--spike-warning acts on. Per signal, each rule:
- relative "x k": a crossing is a value above k x the mean of the signal's previous `window`
  observations (at least `min_history`); an observation is a step for the gradient norm, a step the
  monitor captured for the others (so a monitor signal can warn only where a captured step falls
  within the horizon);
- absolute "> v" (log Z and attention logits, whose scale means something on its own): a value above v.
Consecutive spiky steps are one spike, at its first step. A spike is warned when the signal crossed
within the `horizon` steps before it (a crossing at the spike's own step is too late to act on);
its lead is the steps from the first such crossing. A crossing is a false alarm when no spiky step
follows within the horizon (the crossing's own step included). A run that never recorded the signal counts for neither its spikes nor its crossings.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, field

from megatron_snm.analysis.run_history import RunHistory, SpikeRules, run_directories, spikes
from megatron_snm.warning_signals import GRAD_NORM, SIGNALS, RunningThreshold, monitor_signal


@dataclass(frozen=True)
class Settings:
    factors: tuple[float, ...] = (1.5, 2.0, 4.0)
    absolute: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        # log Z starts near ln(vocabulary) (10.8 for GPT-2's) and z-loss pulls it to 0; attention
        # logits of a few tens saturate the softmax (Wortsman et al. 2023 see ~1e3-1e4 before divergence).
        "log_z": (10.0, 20.0, 50.0), "max_attention_logit": (10.0, 30.0, 100.0)})
    window: int = 20
    min_history: int = 5
    horizon: int = 20


@dataclass(frozen=True)
class Run:
    name: str
    history: RunHistory


def read_runs(directories: list[str]) -> list[Run]:
    """Every run of sweep output directories (DIR/runs/NAME with a train.log), or run directories."""
    return [Run(d, RunHistory.read(os.path.join(d, "train.log"), os.path.join(d, "tensorboard")))
            for d in run_directories(directories)]


def signal_series(history: RunHistory, signal: str) -> dict[int, float]:
    """Step -> the signal's value, at every step that recorded it."""
    if signal == GRAD_NORM:
        return {s: v for s, v in history.grad_norm.items() if math.isfinite(v)}
    values = {step: monitor_signal(figures, signal) for step, figures in history.stability.items()}
    return {s: v for s, v in values.items() if v is not None}


def crossings(series: dict[int, float], rule: tuple[str, float], settings: Settings) -> list[int]:
    kind, value = rule
    if kind == "absolute":
        return [s for s, v in series.items() if v > value]
    threshold = RunningThreshold(value, settings.window, settings.min_history)
    return [s for s, v in series.items() if threshold.observe(v)]


def rules_for(signal: str, settings: Settings) -> list[tuple[str, float]]:
    return [("relative", k) for k in settings.factors] + [("absolute", v) for v in settings.absolute.get(signal, ())]


def rule_text(rule: tuple[str, float]) -> str:
    kind, value = rule
    return f"x{value:g} mean" if kind == "relative" else f"> {value:g}"


def spike_events(spike_steps: list[int]) -> list[int]:
    """The first step of each run of consecutive spiky steps."""
    return [s for s in spike_steps if s - 1 not in spike_steps]


def score(spike_steps: list[int], crossed: list[int], horizon: int) -> dict:
    """One run's warned spikes (with their leads) and false alarms."""
    leads = []
    for spike in spike_events(spike_steps):
        before = [c for c in crossed if spike - horizon <= c < spike]
        if before:
            leads.append(spike - before[0])
    false_alarms = [c for c in crossed if not any(c <= s <= c + horizon for s in spike_steps)]
    return dict(leads=leads, false_alarms=len(false_alarms))


def early_warning(runs: list[Run], rules: SpikeRules, settings: Settings) -> dict:
    """The table (rows: signal x rule) with the settings and each run's loss spikes."""
    loss_spikes = {run.name: spikes(run.history.loss, rules.loss_factor, rules.window, rules.min_history)
                   for run in runs}
    rows, absent = [], []
    for signal in SIGNALS:
        series = {run.name: signal_series(run.history, signal) for run in runs}
        series = {name: values for name, values in series.items() if values}
        if not series:
            absent.append(signal)
            continue
        spike_count = sum(len(spike_events(loss_spikes[name])) for name in series)
        for rule in rules_for(signal, settings):
            leads, crossed_total, false_alarms = [], 0, 0
            for name, values in series.items():
                crossed = crossings(values, rule, settings)
                scored = score(loss_spikes[name], crossed, settings.horizon)
                leads += scored["leads"]
                crossed_total += len(crossed)
                false_alarms += scored["false_alarms"]
            rows.append(dict(
                signal=signal, rule=rule_text(rule), runs=len(series), spikes=spike_count, warned=len(leads),
                missed=spike_count - len(leads), lead_median=statistics.median(leads) if leads else None,
                lead_min=min(leads) if leads else None, crossings=crossed_total, false_alarms=false_alarms))
    return dict(settings=dict(asdict(settings), spike_rules=asdict(rules)), rows=rows, absent_signals=absent,
                runs=[dict(name=run.name, steps=len(run.history.loss), loss_spikes=loss_spikes[run.name],
                           spikes=spike_events(loss_spikes[run.name])) for run in runs])


COLUMNS = ("signal", "rule", "runs", "spikes", "warned", "missed", "lead_median", "lead_min", "crossings",
           "false_alarms")


def _cell(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def markdown(table: dict) -> str:
    s = table["settings"]
    lines = [f"Loss spikes: loss > {s['spike_rules']['loss_factor']:g} x the mean of the previous "
             f"{s['spike_rules']['window']} steps; a crossing warns a spike within the {s['horizon']} steps after "
             f"it; relative rules against the mean of the signal's previous {s['window']} observations "
             f"(at least {s['min_history']}); consecutive spiky steps are one spike. {len(table['runs'])} runs, "
             f"{sum(len(r['spikes']) for r in table['runs'])} loss spikes.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in table["rows"]]
    if table["absent_signals"]:
        lines += ["", "Not recorded in any run: " + ", ".join(table["absent_signals"]) + "."]
    return "\n".join(lines) + "\n"


def text_table(table: dict) -> str:
    cells = [COLUMNS] + [tuple(_cell(row[c]) for c in COLUMNS) for row in table["rows"]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)
