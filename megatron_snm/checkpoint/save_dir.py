"""One run owns its `--save` directory, and the directory can take a checkpoint before training starts.

    lock = claim_save_dir(save, load, bytes_needed)   # rank 0; raises CheckpointError naming --save

- An exclusive lock (`DIR/.megatron_snm.lock`, flock'ed for the run's lifetime, with the owner's
  host and pid inside): a second run writing the same directory is refused. The kernel releases
  the lock when its process dies, so a lock file left by a killed run is stale: it is reported
  and taken over.
- A run that does not `--load` this directory refuses a `--save` that already holds checkpoints,
  so a fresh run never replaces another run's checkpoints.
- The directory is writable and its file system has room for one more checkpoint.
- A run resumed from an older checkpoint than the newest in the directory (`--load-iteration`, or
  `--finetune`, with --load = --save) would overwrite the newer ones as it goes: refused unless
  --overwrite-newer-checkpoints.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket

from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.units import human

LOCK = ".megatron_snm.lock"
log = logging.getLogger(__name__)


def holds_checkpoints(directory: str) -> list[str]:
    """The checkpoint entries (`latest`, `iter_*`) in `directory`."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n == "latest" or re.fullmatch(r"iter_\d{7}", n))


class SaveDirLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise CheckpointError(f"--save {directory} is in use by another run ({owner}); two runs writing one "
                                  "directory would interleave their checkpoints: give this run another --save") from None
        self._file.seek(0)
        previous = self._file.read().strip()
        if previous:
            log.warning("--save %s: removed the stale lock of a run that is gone (%s)", directory, previous)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            os.unlink(self.path)
            self._file.close()


def check_no_newer_checkpoints(save: str, start_iteration: int, allowed: bool) -> None:
    """A run that starts at `start_iteration` in `save` would overwrite the checkpoints of later
    iterations there as it reaches them: refuse unless `allowed` (--overwrite-newer-checkpoints)."""
    newer = sorted(int(n[len("iter_"):]) for n in holds_checkpoints(save)
                   if n.startswith("iter_") and int(n[len("iter_"):]) > start_iteration)
    if newer and not allowed:
        raise CheckpointError(
            f"--save {save} holds checkpoints newer than the iteration this run starts from ({start_iteration}): "
            f"iteration{'s' if len(newer) > 1 else ''} {', '.join(map(str, newer[:5]))}{', ...' if len(newer) > 5 else ''}"
            ", which this run would overwrite: give another --save to keep them, or --overwrite-newer-checkpoints")


def claim_save_dir(save: str, load: str | None, bytes_needed: int, older_start: int | None = None,
                   overwrite_newer: bool = False) -> SaveDirLock:
    """Checks and locks `save` for this run (call on one rank; raises CheckpointError). `older_start`:
    the iteration the run starts from when the user chose a checkpoint other than the newest
    (--load-iteration, --finetune), else None."""
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(f"--save {save} is not writable: {err}") from None
    lock = SaveDirLock(save)
    try:
        existing = holds_checkpoints(save)
        resuming_here = load is not None and os.path.realpath(load) == os.path.realpath(save)
        if existing and not resuming_here:
            raise CheckpointError(
                f"--save {save} already holds checkpoints ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}) "
                f"of another run: to resume that run add --load {save}; to start a new one give another --save")
        if resuming_here and older_start is not None:
            check_no_newer_checkpoints(save, older_start, overwrite_newer)
        free = shutil.disk_usage(save).free
        if free < bytes_needed:
            raise CheckpointError(f"--save {save}: {human(free)} free, a checkpoint of this run needs about "
                                  f"{human(bytes_needed)} ({human(bytes_needed - free)} more): free space or give "
                                  "another --save")
    except BaseException:
        lock.release()
        raise
    return lock
