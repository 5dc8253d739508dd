"""Workers end with their launcher.

Kill only `torchrun` or the `deepspeed` launcher (SIGKILL, a node agent that died) and its workers
would be reparented and go on training and saving, orphaned, into a directory the next run
wants. `watch_launcher()` finds this process's launcher ancestors (the processes above it whose
command line is a known launcher: deepspeed's runner and its per-node `launch`, torchrun /
torch.distributed.run, mpirun / orted / prterun) and a daemon thread ends this process within
seconds of any of them disappearing. Without a launcher above it (a plain `python`), it does
nothing.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import psutil

_LAUNCHERS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch", "mpirun", "orted",
              "prterun", "mpiexec")


def launcher_ancestors() -> list[psutil.Process]:
    ancestors, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            cmdline = " ".join(proc.cmdline())
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            break
        if not any(name in cmdline for name in _LAUNCHERS):
            break
        ancestors.append(proc)
        proc = proc.parent()
    return ancestors


def watch_launcher(poll_seconds: float = 1.0) -> list[int]:
    """Starts the watchdog thread; returns the watched launchers' pids."""
    watched = launcher_ancestors()

    def watch():
        while True:
            time.sleep(poll_seconds)
            for proc in watched:
                try:
                    alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    alive = False
                if not alive:
                    print(f"pretrain_gpt.py: error: the launcher (pid {proc.pid}) is gone; this worker (pid "
                          f"{os.getpid()}) exits instead of training on orphaned", file=sys.stderr, flush=True)
                    os._exit(1)

    if watched:
        threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    return [p.pid for p in watched]
