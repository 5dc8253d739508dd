"""benchmarks/gpu_stability.sh cannot rot: its CPU dry run (DEVICE=cpu: the same sweep, report and
plots at a tiny shape, 4 steps, fp32) runs here, so a change that breaks its command lines, the
sweep's flags or the report fails the suite rather than a lent GPU's few minutes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_stability_study(tmp_path):
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PATH=BIN + os.pathsep + os.environ["PATH"])
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_stability.sh", "--output-dir", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert sorted((r["method"], r["lr"]) for r in summary) == sorted(
        (m, lr) for m in ("vanilla", "embed-ln", "scaled-embed") for lr in (1e-3, 1e-2))
    for r in summary:
        assert r["status"] == "done" and r["steps"] == 4 and r["final_valid_loss"] is not None, r
        command = (tmp_path / "study" / "runs" / r["name"] / "command.txt").read_text()
        assert "--init-method-std 0.0132" in command and "--adam-beta2 0.95" in command, command
    report = json.loads((tmp_path / "study" / "report.json").read_text())
    assert sorted(row["method"] for row in report["methods"]) == ["embed-ln", "scaled-embed", "vanilla"]
    assert report["unigram"]["loss"] > 0
    pngs = [tmp_path / "study" / "final_loss_vs_lr.png", *sorted((tmp_path / "plots").glob("*-loss.png"))]
    assert len(pngs) == 2
    for path in pngs:
        with Image.open(path) as image:
            assert image.format == "PNG"
    # The last lines printed are the report's table.
    assert "| gpt2 | vanilla |" in proc.stdout and "figures:" in proc.stdout.strip().splitlines()[-1]


def test_gpu_stability_refuses_unknown_arguments():
    proc = subprocess.run(["bash", "benchmarks/gpu_stability.sh", "--steps", "3"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
