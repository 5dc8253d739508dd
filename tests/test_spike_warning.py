"""--spike-warning: a signal crossing its threshold logs a warning and saves a checkpoint at once,
so a rollback finds a checkpoint close to the spike; its flag's refusals; the monitor signals.

Iteration 6's loss is multiplied by 50 (its gradient norm jumps ~50x: the warning's precursor), and
iteration 8's loss is NaN (--inject-divergence-at; --max-skipped-steps 1: a divergence, rolled back).
With --save-interval 4 and no warning the rollback goes back to iter_4; with the warning to iter_6.
"""
import json
import os

import pytest

from megatron_snm.checkpoint.format import tag_of
from megatron_snm.config import ConfigError, parse_args, resolve
from megatron_snm.training.skip_ledger import LEDGER
from megatron_snm.training.spike_warning import SpikeWarning
from tests.training_harness import INJECT_LOSS_ENV, TINY, run_configs


def rolling(save_dir, *extra):
    return TINY + ["--save", str(save_dir), "--save-interval", "4", "--on-divergence", "rollback",
                   "--max-skipped-steps", "1", "--rollback-margin", "0", "--inject-divergence-at", "8", *extra]


@pytest.fixture
def gradient_spike_at_6():
    os.environ[INJECT_LOSS_ENV] = "6:50"
    yield
    del os.environ[INJECT_LOSS_ENV]


def test_the_warning_saves_a_checkpoint_that_the_rollback_finds(tmp_path, capfd, gradient_spike_at_6):
    warned, plain = run_configs(1, [rolling(tmp_path / "warned", "--spike-warning", "grad_norm:4"),
                                    rolling(tmp_path / "plain")])
    pipelined = run_configs(2, [rolling(tmp_path / "pp2", "--spike-warning", "grad_norm:4",
                                        "--pipeline-model-parallel-size", "2")])[0]
    out = capfd.readouterr().out
    warnings = [line for line in out.splitlines() if " spike warning at " in line]
    assert len(warnings) == 2 and all(line.startswith(" spike warning at iteration 6: grad_norm ") and
                                      line.endswith("(--spike-warning); saving a checkpoint") for line in warnings)
    assert warned.rollbacks == [(8, 6)] and pipelined.rollbacks == [(8, 6)]
    assert plain.rollbacks == [(8, 4)]
    for save in ("warned", "pp2"):
        assert (tmp_path / save / tag_of(6)).is_dir()
        assert f"reloaded {tag_of(6)}, skipping iterations 7-8" in out
    assert not (tmp_path / "plain" / tag_of(6)).exists()
    # The closer checkpoint loses less training: the rollback drops iterations 7-8 instead of 5-8.
    ledger = {save: [json.loads(line)["iterations"] for line in (tmp_path / save / LEDGER).read_text().splitlines()]
              for save in ("warned", "plain", "pp2")}
    assert ledger == {"warned": [[7, 8]], "plain": [[5, 8]], "pp2": [[7, 8]]}


def test_monitor_signals_are_the_largest_of_their_figures():
    warning = SpikeWarning("update_rms_ratio", 2.0, window=20)
    flat = {"update_rms_ratio/layer_01": 1e-3, "update_rms_ratio/layer_02": 2e-3, "residual_std/layer_01": 5.0}
    assert [warning.observe(9.0, flat) for _ in range(5)] == [None] * 5  # 5 observations of 2e-3
    assert warning.observe(99.0, {}) is None  # a step the monitor did not capture: nothing observed
    assert warning.observe(9.0, dict(flat, **{"update_rms_ratio/layer_01": 3e-3})) is None  # 3e-3 < 2 x 2e-3
    why = warning.observe(9.0, dict(flat, **{"update_rms_ratio/embedding": 9e-3}))
    assert why == "update_rms_ratio 0.009 > 2 x its running mean 0.002167"


@pytest.mark.parametrize("flags, message", [
    (["--spike-warning", "grad_norm:4"], "--spike-warning saves a checkpoint when it fires: give --save"),
    (["--spike-warning", "loss:4", "--save", "x"], "unknown signal 'loss'"),
    (["--spike-warning", "grad_norm:1", "--save", "x"], "the factor must be a finite number above 1"),
    (["--spike-warning", "grad_norm", "--save", "x"], "expected SIGNAL:FACTOR"),
    (["--spike-warning", "log_z:3", "--save", "x"], "log_z is measured by the stability monitor: give "
                                                     "--log-stability-interval"),
])
def test_refusals_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match="--spike-warning|--save") as err:
        resolve(parse_args(TINY + flags), 1)
    assert message in str(err.value)
    assert resolve(parse_args(TINY + ["--spike-warning", "log_z:3", "--save", "x", "--log-stability-interval", "5"]),
                   1).spike_warning == ("log_z", 3.0)


def test_a_checkpoint_gives_back_the_history_of_the_same_signal_only():
    saved = SpikeWarning("grad_norm", 4.0, window=20)
    for value in (1.0, 1.0, 1.0, 1.0, 1.0):
        saved.observe(value, {})
    same, other = SpikeWarning("grad_norm", 4.0, window=20), SpikeWarning("update_rms_ratio", 4.0, window=20)
    same.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict())
    assert same.observe(5.0, {}) == "grad_norm 5 > 4 x its running mean 1"  # 5 observations: it may fire
    assert other.observe(9.0, {"update_rms_ratio/embedding": 1.0}) is None and other.threshold.mean() == 1.0
