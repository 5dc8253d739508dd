"""The early-warning study (analysis/early_warning.py, tools/early_warning.py) on synthetic sweep
runs written through the trainer's own writers (training/metrics.py: Megatron's log lines and the
TensorBoard scalars), with known loss spikes and known precursors, so every count and lead is known.

Run "a" (100 steps, the monitor every 5): a loss spike at step 60; the gradient norm jumps at 20
(nothing follows: a false alarm) and at 55 (5 steps ahead); layer_02's update/weight ratio jumps
at 50 (10 steps ahead; the other modules' stay flat). Run "b" (80 steps): a spike at 40 that only
log Z announces, at 35 (25 against 4 elsewhere), and that lasts two steps (40 and 41: one spike);
its gradient norm and ratios stay flat.
"""
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_snm.analysis.early_warning import Settings, early_warning, read_runs
from megatron_snm.analysis.run_history import SpikeRules
from megatron_snm.config import parse_args, resolve
from megatron_snm.training.callbacks import StepReport
from megatron_snm.training.engine import StepResult
from megatron_snm.training.metrics import TrainingMetrics
from megatron_snm.training.spikes import Verdict
from tests.training_harness import TINY

REPO = Path(__file__).resolve().parents[1]


def write_run(run_dir, steps, loss_at, grad_norm_at, figures_at):
    """train.log and tensorboard/ of a run as the trainer writes them."""
    run_dir.mkdir(parents=True)
    run = resolve(parse_args(TINY + ["--train-iters", str(steps), "--log-interval", "10",
                                     "--tensorboard-dir", str(run_dir / "tensorboard")]), 1)
    metrics = TrainingMetrics(run, flops_per_token=1.0, rank=0)
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log):
        for it in range(1, steps + 1):
            result = StepResult(loss_at(it), grad_norm_at(it), finite=True, applied=True)
            metrics.post_step(StepReport(it, it * 8, 1e-3, result, Verdict(False, False, False), 1.0, 0, 0, 0, None))
            if it % 5 == 0:
                metrics.stability(figures_at(it), it)
    metrics.close()


def figures(it, ratio=1e-3, layer_02_ratio=1e-3, log_z=4.0):
    return {"update_rms_ratio/embedding": ratio, "update_rms_ratio/layer_01": ratio,
            "update_rms_ratio/layer_02": layer_02_ratio, "residual_std/layer_01": 1.0 + 1e-3 * it,
            "ln_amplification/layer_01.ln_1": 1.0, "log_z/mean": log_z}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    write_run(root / "runs" / "a", 100, lambda it: 6.0 if it == 60 else 3.0,
              lambda it: 5.0 if it in (20, 55) else 1.0,
              lambda it: figures(it, layer_02_ratio=1e-2 if it == 50 else 1e-3))
    write_run(root / "runs" / "b", 80, lambda it: 6.0 if it in (40, 41) else 3.0, lambda it: 1.0,
              lambda it: figures(it, log_z=25.0 if it == 35 else 4.0))
    return root


def rows_of(table):
    return {(row["signal"], row["rule"]): {k: row[k] for k in ("runs", "spikes", "warned", "missed", "lead_median",
                                                                "lead_min", "crossings", "false_alarms")}
            for row in table["rows"]}


def row(runs, spikes, warned, lead, crossings, false_alarms):
    return dict(runs=runs, spikes=spikes, warned=warned, missed=spikes - warned, lead_median=lead, lead_min=lead,
                crossings=crossings, false_alarms=false_alarms)


def test_counts_and_leads(sweep):
    table = early_warning(read_runs([str(sweep)]), SpikeRules(), Settings())
    assert [(r["name"].rsplit("/", 1)[1], r["loss_spikes"], r["spikes"]) for r in table["runs"]] == [
        ("a", [60], [60]), ("b", [40, 41], [40])]
    rows = rows_of(table)
    for k in ("x1.5 mean", "x2 mean", "x4 mean"):
        assert rows[("grad_norm", k)] == row(2, 2, 1, 5, 2, 1)
        assert rows[("update_rms_ratio", k)] == row(2, 2, 1, 10, 1, 0)
        assert rows[("log_z", k)] == row(2, 2, 1, 5, 1, 0)
        assert rows[("ln_amplification", k)] == row(2, 2, 0, None, 0, 0)
    assert rows[("log_z", "> 10")] == rows[("log_z", "> 20")] == row(2, 2, 1, 5, 1, 0)
    assert rows[("log_z", "> 50")] == row(2, 2, 0, None, 0, 0)
    assert table["absent_signals"] == ["max_attention_logit"]
    # The horizon bounds the lead: 8 steps cannot reach back to the ratio's jump 10 steps ahead.
    short = rows_of(early_warning(read_runs([str(sweep)]), SpikeRules(), Settings(horizon=8)))
    assert short[("update_rms_ratio", "x2 mean")] == row(2, 2, 0, None, 1, 1)
    assert short[("grad_norm", "x2 mean")] == row(2, 2, 1, 5, 2, 1)


def test_tool_prints_and_writes_the_table(sweep, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/early_warning.py", str(sweep), "--output-dir", str(out),
                           "--factors", "2", "--absolute", "log_z=20"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    printed = [line.split() for line in proc.stdout.splitlines()]
    assert ["update_rms_ratio", "x2", "mean", "2", "2", "1", "1", "10", "10", "1", "0"] in printed
    table = json.loads((out / "early_warning.json").read_text())
    assert rows_of(table)[("log_z", "> 20")] == row(2, 2, 1, 5, 1, 0)
    assert {r["rule"] for r in table["rows"]} == {"x2 mean", "> 20"}
    assert "| update_rms_ratio | x2 mean | 2 | 2 | 1 | 1 | 10 | 10 | 1 | 0 |" in (out / "early_warning.md").read_text()

    bad = subprocess.run([sys.executable, "tools/early_warning.py", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("missing: no train.log and no runs/ directory in it")
