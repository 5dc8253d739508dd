"""benchmarks/gpu_check.sh cannot rot: its CPU dry run (the same steps at the tiny shape, fp32, gloo)
runs here, so a change that breaks a step's command line, or the sample run's data split, fails the
suite rather than a lent GPU's few minutes. The extension build is left out (SKIP_STEPS=build): the
suite already runs on the built extensions, and rebuilding them in place under running tests would
replace the loaded libraries."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STEPS = ("pytest_cuda", "layer_norm_bench", "train_throughput", "pretrain_gpt")


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_check_passes(tmp_path):
    from megatron_snm.parallel.spawn import free_port

    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path), PYTHON=sys.executable, SKIP_STEPS="build",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.index("== summary"):]
    for name in STEPS:
        assert re.search(rf"^{name}: ok ", summary, re.M), summary
    # The training step trained to its last iteration and validated on held-out documents.
    log = (tmp_path / "job" / "pretrain_gpt.log").read_text()
    assert re.search(r"iteration +3/ +3 \|", log), log[-3000:]
    assert "validation loss at iteration 3" in log, log[-3000:]
