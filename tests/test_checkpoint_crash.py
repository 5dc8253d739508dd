"""A kill -9 in the middle of a save leaves the previous checkpoint loadable, and the run resumed
from it repeats exactly the steps the killed run had made after that checkpoint."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_snm.checkpoint.format import LATEST, METADATA, read_latest, tag_of
from tests.training_harness import SLEEP_IN_SAVE_ENV
from tests.training_harness import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = TINY + ["--train-iters", "8", "--lr-decay-iters", "8", "--log-interval", "1", "--eval-iters", "0"]
LOSS = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|")


def launch(argv, **env):
    return subprocess.Popen([sys.executable, "-m", "tests.training_harness", *argv], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    flags = RUN + ["--save", str(save), "--save-interval", "3"]
    victim = launch(flags, **{SLEEP_IN_SAVE_ENV: "6:120"})
    in_flight = save / (tag_of(6) + ".tmp") / METADATA  # written just before the hook's sleep
    deadline = time.time() + 240
    while not in_flight.exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "the run never reached its second save"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    before_kill = {int(it): float(loss) for it, loss in LOSS.findall(victim.stdout.read())}
    assert sorted(before_kill) == [1, 2, 3, 4, 5, 6]

    assert read_latest(save) == tag_of(3)
    assert not (save / tag_of(6)).exists() and not (save / (LATEST + ".tmp")).exists()

    resumed = launch(flags + ["--load", str(save)])
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"loaded checkpoint {save} at iteration 3" in out
    losses = {int(it): float(loss) for it, loss in LOSS.findall(out)}
    assert sorted(losses) == [4, 5, 6, 7, 8]
    assert read_latest(save) == tag_of(8)
    assert not (save / (tag_of(6) + ".tmp")).exists()
    for it in (4, 5, 6):
        assert losses[it] == pytest.approx(before_kill[it], rel=1e-6)
