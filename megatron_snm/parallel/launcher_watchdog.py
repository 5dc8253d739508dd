"""Workers end with their launcher.

Kill only `torchrun` or the `deepspeed` launcher (SIGKILL, a node agent that died) and its workers
would be reparented and go on training and saving, orphaned, into a directory the next run
wants. `watch_launcher()` finds this process's launcher ancestors and a daemon thread ends this
process within seconds of any of them disappearing. Without a launcher above it (a plain
`python`), it does nothing.

A launcher is recognised by what it runs, never by words anywhere in its command line: the
program itself (mpirun, mpiexec, orterun, orted, prterun, prted, torchrun, deepspeed), or a
Python interpreter running one of the launchers' modules (`-m deepspeed.launcher.launch`,
`-m torch.distributed.run`, ...) or their console scripts (`python .../bin/deepspeed`). A shell
whose command mentions one (`bash -c "nohup deepspeed ... &"`, what `ssh host 'nohup deepspeed
...&'` runs) is not a launcher: it may exit while the run goes on. The walk up stops at the
first ancestor that is not a launcher.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import psutil

_LAUNCHER_PROGRAMS = frozenset({"deepspeed", "ds", "torchrun", "mpirun", "mpiexec", "orterun", "orted", "prterun",
                                "prted"})
_LAUNCHER_MODULES = frozenset({"deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                               "torch.distributed.launch"})
_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")


def is_launcher(argv: list[str]) -> bool:
    """Whether the command line `argv` runs a distributed launcher (see the module's docstring)."""
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if program in _LAUNCHER_PROGRAMS:
        return True
    if not _PYTHON.match(program):
        return False
    args = iter(argv[1:])
    for arg in args:  # the interpreter's own options come first, then -m MODULE or the script
        if arg == "-m":
            return next(args, "") in _LAUNCHER_MODULES
        if arg.startswith("-m") and len(arg) > 2:
            return arg[2:] in _LAUNCHER_MODULES
        if arg in ("-c", "-"):
            return False
        if arg in ("-W", "-X", "--check-hash-based-pycs"):
            next(args, None)
            continue
        if arg.startswith("-"):
            continue
        return os.path.basename(arg) in _LAUNCHER_PROGRAMS
    return False


def launcher_ancestors() -> list[psutil.Process]:
    ancestors, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            argv = proc.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            break
        if not is_launcher(argv):
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
