"""Non-finite and spiky steps: skipped without any update (weights AND Adam state unchanged),
counted, logged with the stability monitor's figures; a run that keeps skipping saves and stops.

A test hook multiplies the training loss of chosen iterations (MEGATRON_SNM_TEST_INJECT_LOSS):
iteration 4 by NaN, iteration 8 by 50 (a spike over a 3-step running mean). Checkpoints after
every step show exactly which steps changed the model. The skip path differs per engine, so it
is checked for ZeRO-0 (our optimizer measures the norm), ZeRO-2 (DeepSpeed's wrapper) and PP=2
(the pipeline engine, whose last stage alone knows the loss at the optimizer step).
"""
import os

import pytest
import torch

from megatron_snm.checkpoint.format import read_latest, safe_globals, tag_of
from tests.training_harness import INJECT_LOSS_ENV
from tests.training_harness import TINY, run_configs

SPIKY = TINY + ["--train-iters", "9", "--spike-window", "3", "--spike-factor", "3", "--save-interval", "1"]


def tensors(checkpoint_dir):
    """Every tensor in DeepSpeed's files of a checkpoint, by file and key path."""
    found = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    for name in sorted(os.listdir(checkpoint_dir)):
        if name.endswith(".pt") and not name.startswith("rng_state"):
            with torch.serialization.safe_globals(safe_globals()):
                walk(name, torch.load(os.path.join(checkpoint_dir, name), weights_only=True))
    assert found
    return found


def same_state(save_dir, a, b):
    ta, tb = tensors(os.path.join(save_dir, tag_of(a))), tensors(os.path.join(save_dir, tag_of(b)))
    assert ta.keys() == tb.keys()
    return all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def injected():
    os.environ[INJECT_LOSS_ENV] = "4:nan,8:50"
    yield
    del os.environ[INJECT_LOSS_ENV]


def check_skips(run, save_dir):
    assert run.skipped == [4, 8] and run.spikes == [8]
    assert run.losses[4] != run.losses[4]  # NaN
    assert run.losses[8] > 3 * run.losses[7]
    assert same_state(save_dir, 3, 4), "the NaN step changed the model or optimizer"
    assert same_state(save_dir, 7, 8), "the skipped spiky step changed the model or optimizer"
    assert not same_state(save_dir, 4, 5)
    assert run.iteration == 9 and not run.diverged


def test_single_process(tmp_path, injected, capfd):
    skip, keep, stop = (tmp_path / n for n in ("skip", "keep", "stop"))
    runs = run_configs(1, [
        SPIKY + ["--skip-spiky-steps", "--save", str(skip)],
        SPIKY + ["--save", str(keep), "--log-stability-interval", "1"],
        SPIKY + ["--save", str(stop), "--max-skipped-steps", "1"],
    ])
    out = capfd.readouterr().out
    check_skips(runs[0], skip)
    assert " skipped iteration 4: non-finite loss or gradient norm" in out
    assert " skipped iteration 8: loss spike" in out
    assert "number of skipped iterations:   2 | number of nan iterations:   1 |" in out
    assert " loss spike at iteration 8: lm loss" in out
    after = out.split(" stability monitor at iteration 9, the step after the loss spike at iteration 8: ")[1]
    assert "residual_std/layer_01=" in after and "ln_amplification/layer_01.ln_1=" in after

    # Without --skip-spiky-steps the spike is logged but trained on; with the monitor on every
    # step (--log-stability-interval 1) the spike's own figures are in its line.
    spike_lines = [part.splitlines()[0] for part in out.split(" loss spike at iteration 8: lm loss")[1:]]
    assert spike_lines[0].endswith("; stability monitor figures follow at the next step")
    assert "; stability monitor: grad_norm/embedding=" in spike_lines[1]
    assert runs[1].skipped == [4] and runs[1].spikes == [8]
    assert not same_state(keep, 7, 8)

    # --max-skipped-steps 1: the NaN step stops the run with a checkpoint.
    assert runs[2].diverged and runs[2].iteration == 4 and sorted(runs[2].losses) == [1, 2, 3, 4]
    assert read_latest(stop) == tag_of(4) and same_state(stop, 3, 4)
    assert " stopping at iteration 4: 1 steps in a row were skipped (--max-skipped-steps 1)" in out


def test_zero2_and_pipeline(tmp_path, injected):
    zero2, pipe = tmp_path / "zero2", tmp_path / "pipe"
    runs = run_configs(2, [
        SPIKY + ["--skip-spiky-steps", "--zero-stage", "2", "--save", str(zero2)],
        SPIKY + ["--skip-spiky-steps", "--pipeline-model-parallel-size", "2", "--save", str(pipe)],
    ])
    check_skips(runs[0], zero2)
    check_skips(runs[1], pipe)
