"""Nothing lost, nothing silently wrong on the training side: one run owns its --save directory,
damaged checkpoints are refused before any state is touched, a failed save keeps the previous
checkpoint, and bad input ends as one clear error (issue: hardening)."""
import os
import re
import shutil
import subprocess
import time

import pytest

from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.format import LATEST, METADATA, read_latest, rng_file, tag_of
from tests.training_harness import SLEEP_IN_SAVE_ENV
from megatron_snm.checkpoint.save_dir import LOCK
from tests.test_checkpoint_crash import launch
from tests.training_harness import TINY, run_configs

RUN = TINY + ["--train-iters", "4", "--lr-decay-iters", "4", "--eval-iters", "0", "--log-interval", "1"]
LOSS = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run of 4 iterations with checkpoints at 2 and 4, copied afresh for each test that damages it."""
    root = tmp_path_factory.mktemp("saved")
    result, = run_configs(1, [RUN + ["--save", str(root / "ckpt"), "--save-interval", "2"]])
    assert not isinstance(result, Exception) and read_latest(root / "ckpt") == tag_of(4)
    return root / "ckpt", result


@pytest.fixture
def copy(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved[0], target)
    return target


def resume(directory, *extra):
    return RUN + ["--train-iters", "6", "--lr-decay-iters", "4", "--load", str(directory), *extra]


def model_file(checkpoint_dir):
    return next(p for p in sorted(checkpoint_dir.iterdir()) if p.name.endswith("model_states.pt"))


def test_damaged_checkpoints_are_refused_naming_the_file(copy, saved):
    last = copy / tag_of(4)
    with open(model_file(last), "r+b") as f:  # bytes changed in place, same size
        f.seek(os.path.getsize(model_file(last)) // 2)
        f.write(b"\x00garbage\x00")
    (copy / "other").mkdir()
    shutil.copytree(copy / tag_of(2), copy / "other" / tag_of(2))
    os.remove(copy / "other" / tag_of(2) / rng_file(0))
    (copy / "other" / LATEST).write_text(tag_of(2))
    (copy / "outside").mkdir()
    (copy / "outside" / LATEST).write_text("../../etc")
    changed, no_rng, bad_latest, previous = run_configs(1, [
        resume(copy), resume(copy / "other"), resume(copy / "outside"), resume(copy, "--load-iteration", "2")])
    assert isinstance(changed, CheckpointError)
    assert f"{model_file(last)} does not match its checksum" in str(changed)
    assert isinstance(no_rng, CheckpointError) and f"{rng_file(0)} is missing" in str(no_rng)
    assert isinstance(bad_latest, CheckpointError) and "not a checkpoint directory" in str(bad_latest)
    # --load-iteration falls back to the checkpoint before the damaged one, and resumes exactly.
    assert sorted(previous.losses) == [3, 4, 5, 6]
    assert previous.losses[3] == pytest.approx(saved[1].losses[3], rel=1e-6)
    assert previous.losses[4] == pytest.approx(saved[1].losses[4], rel=1e-6)


def test_truncated_file_and_corrupt_metadata_are_refused(copy):
    path = model_file(copy / tag_of(4))
    with open(path, "r+b") as f:
        f.truncate(100)
    meta = copy / tag_of(2) / METADATA
    meta.write_text(meta.read_text()[:-20])
    truncated, corrupt = run_configs(1, [resume(copy), resume(copy, "--load-iteration", "2")])
    assert isinstance(truncated, CheckpointError) and "truncated or replaced" in str(truncated)
    assert isinstance(corrupt, CheckpointError) and str(meta) in str(corrupt)


def test_precision_and_differing_arguments(copy, capfd):
    bf16, other_seed = run_configs(1, [resume(copy, "--bf16"), resume(copy, "--save", str(copy), "--seed", "8")])
    assert "holds float32 weights; this run trains in bfloat16" in str(bf16)
    assert sorted(other_seed.losses) == [5, 6]
    assert "arguments that differ from the checkpoint's: seed: 7 -> 8" in capfd.readouterr().out


def test_a_fresh_run_never_replaces_another_runs_checkpoints(copy):
    fresh, = run_configs(1, [RUN + ["--save", str(copy)]])
    assert isinstance(fresh, CheckpointError)
    assert f"--save {copy} already holds checkpoints" in str(fresh) and f"add --load {copy}" in str(fresh)
    assert read_latest(copy) == tag_of(4) and (copy / tag_of(4)).is_dir()


def test_two_runs_cannot_share_a_save_directory_and_a_dead_runs_lock_is_stale(tmp_path):
    save = tmp_path / "ckpt"
    flags = RUN + ["--train-iters", "8", "--save", str(save), "--save-interval", "1"]
    first = launch(flags, **{SLEEP_IN_SAVE_ENV: "2:120"})
    deadline = time.time() + 240
    while not (save / (tag_of(2) + ".tmp") / METADATA).exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    second = launch(flags + ["--load", str(save)])
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 2, out
    assert f"--save {save} is in use by another run (host " in out and "Traceback" not in out
    os.killpg(first.pid, 9)
    first.wait()
    assert (save / LOCK).exists()  # a SIGKILLed run leaves its lock file behind ...
    third = launch(flags + ["--load", str(save)])
    out, _ = third.communicate(timeout=240)
    assert third.returncode == 0, out
    assert "removed the stale lock of a run that is gone" in out  # ... which the next run takes over
    assert read_latest(save) == tag_of(8) and not (save / LOCK).exists()


def _mount_tmpfs(path, size):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_full_disk_at_save_keeps_the_previous_checkpoint(saved, tmp_path):
    one = sum(p.stat().st_size for p in (saved[0] / tag_of(2)).iterdir())
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "8m")
    try:
        # Room for the start-up check and the first checkpoint, not for the second.
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - int(1.5 * one)))
        result, = run_configs(1, [RUN + ["--save", str(disk / "ckpt"), "--save-interval", "1"]])
        if isinstance(result, CheckpointError) and " free, a checkpoint of this run needs about" in str(result):
            pytest.skip("the start-up room estimate exceeds the room left for the test")
        assert isinstance(result, CheckpointError), result
        assert "bytes free on its file system" in str(result) and f"`latest` still names {tag_of(1)}" in str(result)
        assert read_latest(disk / "ckpt") == tag_of(1)
        assert sorted(os.listdir(disk / "ckpt")) == [tag_of(1), LATEST]  # no .tmp left, lock released
    finally:
        subprocess.run(["umount", str(disk)])


def test_read_only_or_full_save_directory_is_refused_before_training(tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "64k")
    try:
        small, = run_configs(1, [RUN + ["--save", str(disk / "ckpt")]])
        assert isinstance(small, CheckpointError), small
        # In units that say something: a 64 KiB disk is not "0.00 GiB free, needs about 0.00 GiB".
        assert re.search(r": \d+(\.\d)? (bytes|KiB) free, a checkpoint of this run needs about \d+\.\d (KiB|MiB)",
                         str(small)), small
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        read_only, = run_configs(1, [RUN + ["--save", str(disk / "ckpt2")]])
        assert isinstance(read_only, CheckpointError) and "is not writable" in str(read_only)
    finally:
        subprocess.run(["umount", str(disk)])


def test_resuming_an_older_iteration_into_the_same_save_is_refused_unless_asked(copy):
    """--load-iteration 2 with --save = --load would overwrite iteration 4's checkpoint as it got
    there: refused, naming the flag; with --overwrite-newer-checkpoints it goes on. Starting from
    the newest (no --load-iteration) is an ordinary resume."""
    before = {p.name: p.stat().st_mtime_ns for p in (copy / tag_of(4)).iterdir()}
    older = resume(copy, "--load-iteration", "2", "--save", str(copy), "--save-interval", "2")
    refused, allowed = run_configs(1, [older, older + ["--overwrite-newer-checkpoints"]])
    assert isinstance(refused, CheckpointError), refused
    assert "newer than the iteration this run starts from (2): iteration 4" in str(refused)
    assert "--overwrite-newer-checkpoints" in str(refused) and "another --save" in str(refused)
    assert not isinstance(allowed, Exception), allowed
    assert read_latest(copy) == tag_of(6)
    assert {p.name: p.stat().st_mtime_ns for p in (copy / tag_of(4)).iterdir()} != before  # rewritten, as asked


def test_a_save_check_names_sizes_in_units_that_say_something(tmp_path):
    from megatron_snm.units import human
    from megatron_snm.checkpoint.save_dir import claim_save_dir

    assert [human(n) for n in (0, 500, 1536, 3 * 2**20, 5.5 * 2**30)] == [
        "0 bytes", "500 bytes", "1.5 KiB", "3.0 MiB", "5.50 GiB"]
    with pytest.raises(CheckpointError, match=r"(GiB|MiB|KiB|bytes) free, a checkpoint of this run needs about 1048576\.00 GiB"):
        claim_save_dir(str(tmp_path / "ckpt"), None, 2**50)
