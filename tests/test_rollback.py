"""Runs that survive a divergence: rollback to the last good checkpoint past the data that led into
it, equal to a run told to skip that data from the start; the ledger survives a relaunch; under
TP=2 and PP=2 too. Plus checkpoint retention and the spike rules."""
import json
import os

import pytest

from megatron_snm.checkpoint.format import read_latest, tag_of
from megatron_snm.training.skip_ledger import LEDGER
from megatron_snm.training.spikes import SpikePolicy
from tests.training_harness import TINY, run_configs

BASE = TINY + ["--train-iters", "10", "--lr-decay-iters", "10", "--eval-iters", "0", "--hidden-dropout", "0.1"]


def diverging(save_dir, *extra):
    """Diverges at iteration 5 (a NaN loss with --max-skipped-steps 1), rolls back to iter_4 and
    skips iterations 5 and 6 (--rollback-margin 1)."""
    return BASE + ["--save", str(save_dir), "--save-interval", "2", "--on-divergence", "rollback",
                   "--max-skipped-steps", "1", "--rollback-margin", "1", "--inject-divergence-at", "5", *extra]


def skipping(*extra):
    return BASE + ["--iterations-to-skip", "5", "6", *extra]


def check(rolled, skipped, save_dir, layout):
    assert rolled.rollbacks == [(5, 4)], layout
    assert sorted(rolled.losses) == [1, 2, 3, 4, 5, 7, 8, 9, 10], layout
    assert rolled.losses[5] != rolled.losses[5]  # the injected NaN
    assert sorted(skipped.losses) == [1, 2, 3, 4, 7, 8, 9, 10], layout
    for it in (1, 2, 3, 4, 7, 8, 9, 10):
        assert rolled.losses[it] == pytest.approx(skipped.losses[it], rel=1e-6), (layout, it)
    entries = [json.loads(line) for line in (save_dir / LEDGER).read_text().splitlines()]
    assert len(entries) == 1
    assert entries[0]["iterations"] == [5, 6] and entries[0]["samples"] == [32, 48]  # global batch 8
    assert entries[0]["checkpoint"] == tag_of(4) and entries[0]["diverged_at"] == 5
    assert read_latest(save_dir) == tag_of(10) and not rolled.diverged


def test_rollback_equals_skipping_from_the_start_and_survives_a_relaunch(tmp_path, capfd):
    save = tmp_path / "rolled"
    rolled, skipped, relaunched, stopped = run_configs(1, [
        diverging(save), skipping(),
        # A relaunch from the checkpoint before the divergence reads the ledger and skips again.
        BASE + ["--load", str(save), "--load-iteration", "4", "--save", str(save), "--save-interval", "2",
                "--overwrite-newer-checkpoints"],  # it replaces iterations 6-10 as it reaches them
        diverging(tmp_path / "stopped", "--max-rollbacks", "0"),
    ])
    check(rolled, skipped, save, "1 process")
    out = capfd.readouterr().out
    assert "rollback 1/3: diverged at iteration 5 (1 steps in a row were skipped (--max-skipped-steps 1)); " \
           f"reloaded {tag_of(4)}, skipping iterations 5-6 (training samples 32-47" in out
    assert sorted(relaunched.losses) == [7, 8, 9, 10]
    for it in (7, 8, 9, 10):
        assert relaunched.losses[it] == pytest.approx(rolled.losses[it], rel=1e-6)
    assert stopped.diverged and stopped.iteration == 5 and not stopped.rollbacks


def test_rollback_under_tp2_and_pp2(tmp_path):
    tp, pp = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"]
    results = run_configs(2, [diverging(tmp_path / "tp", *tp), skipping(*tp),
                              diverging(tmp_path / "pp", *pp), skipping(*pp)])
    check(results[0], results[1], tmp_path / "tp", "TP=2")
    check(results[2], results[3], tmp_path / "pp", "PP=2")


def test_keep_last_n_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    result, = run_configs(1, [BASE + ["--train-iters", "6", "--save", str(save), "--save-interval", "1",
                                      "--keep-last-n-checkpoints", "2", "--hidden-dropout", "0"]])
    assert not result.diverged
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == [tag_of(5), tag_of(6)]
    assert read_latest(save) == tag_of(6)


def test_spike_rules():
    ratio = SpikePolicy(factor=3.0, window=4, skip_spiky=True, max_skipped_in_a_row=0)
    zscore = SpikePolicy(factor=0.0, window=4, skip_spiky=True, max_skipped_in_a_row=0, zscore=3.0)
    grad = SpikePolicy(factor=0.0, window=4, skip_spiky=False, max_skipped_in_a_row=0, grad_factor=2.0)
    spiky = SpikePolicy(factor=1.5, window=4, skip_spiky=False, max_skipped_in_a_row=0, max_spiky_in_a_row=2)
    for policy in (ratio, zscore, grad, spiky):
        for loss in (2.0, 2.1, 1.9, 2.0):
            policy.record(loss, policy.judge(loss, True, 1.0), True, 1.0)
    # mean 2.0, std ~0.07: 2.5 is far above mean + 3 std but below 3 x mean.
    assert not ratio.judge(2.5, True).spike and ratio.judge(6.5, True).skip
    assert zscore.judge(2.5, True).skip and not zscore.judge(2.1, True).spike
    assert zscore.gate().spike_threshold == pytest.approx(2.0 + 3 * 0.0707, rel=1e-3)
    assert grad.judge(2.0, True, 2.5).grad_norm_spike and not grad.judge(2.0, True, 1.5).grad_norm_spike
    assert not grad.judge(2.0, True, 2.5).skip  # gradient-norm spikes are counted, not skipped
    for _ in range(2):
        assert not spiky.diverged()
        spiky.record(9.0, spiky.judge(9.0, True), True)
    assert spiky.diverged() and "2 loss spikes in a row (--max-spiky-steps 2)" in spiky.divergence()


def test_async_save_equals_sync_save(tmp_path):
    """--async-save writes the same checkpoints (same files, same resume) from a background thread."""
    flags = BASE + ["--train-iters", "6", "--save-interval", "2", "--hidden-dropout", "0"]
    sync, asynchronous, resumed = run_configs(1, [
        flags + ["--save", str(tmp_path / "sync")], flags + ["--save", str(tmp_path / "async"), "--async-save"],
        flags + ["--train-iters", "8", "--load", str(tmp_path / "async"), "--load-iteration", "4",
                 "--save", str(tmp_path / "resumed")]])
    assert sync.losses == asynchronous.losses
    for tag in (tag_of(2), tag_of(4), tag_of(6)):
        a, b = tmp_path / "sync" / tag, tmp_path / "async" / tag
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        manifest = json.loads((a / "manifest.json").read_text())["files"]
        assert manifest.keys() == json.loads((b / "manifest.json").read_text())["files"].keys()
    assert read_latest(tmp_path / "async") == tag_of(6)
    assert resumed.losses[5] == pytest.approx(sync.losses[5], rel=1e-6)
    assert resumed.losses[6] == pytest.approx(sync.losses[6], rel=1e-6)
