"""A function over a stream of items on worker processes, results in input order, that a dead
worker can never hang.

    with OrderedPool(tokenize_chunk, workers=8, initializer=init, initargs=(tok,)) as pool:
        for result in pool.map(read_chunks(files)):
            ...

Why not concurrent.futures or multiprocessing.Pool: their workers share one result pipe, so a
worker killed halfway through sending a result leaves a partial message that the reader waits
on forever, while the other workers keep the pipe open (a hang that even SIGTERM cannot end,
since shutdown joins that reader). Here every worker has its own task and result pipes, whose
other ends only the main process holds: a dead worker's result pipe reads as end-of-file at
once, and its process sentinel fires, so `map` raises WorkerDied within milliseconds.

Each worker has at most one item at a time, and at most `2 * workers` results are held for
reordering, so memory stays bounded however long the stream.
"""
from __future__ import annotations

import collections
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from typing import Callable, Iterable, Iterator


class WorkerDied(RuntimeError):
    """A worker process ended (killed, out of memory) before returning its result."""


class WorkerFailed(RuntimeError):
    """The function raised in a worker; the message holds the worker's traceback."""


def _serve(fn, initializer, initargs, tasks, results, inherited, parent: int) -> None:
    for conn in inherited:  # the other workers' pipe ends, copied by fork: not ours to hold
        conn.close()
    # Ctrl-C reaches the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):  # die with the main process rather than be orphaned
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            item = tasks.recv()
        except EOFError:  # the main process closed our task pipe: done
            return
        try:
            reply = (True, fn(item))
        except BaseException:
            reply = (False, traceback.format_exc())
        results.send(reply)


class _Worker:
    def __init__(self, ctx, index: int, fn, initializer, initargs, inherited):
        task_reader, self.tasks = ctx.Pipe(duplex=False)
        self.results, result_writer = ctx.Pipe(duplex=False)
        self.index = index
        self.process = ctx.Process(
            target=_serve, args=(fn, initializer, initargs, task_reader, result_writer, inherited, os.getpid()),
            name=f"worker-{index}", daemon=True,
        )
        self.process.start()
        # Only the worker may hold these ends: its death then reads as end-of-file here.
        task_reader.close()
        result_writer.close()
        self.sequence: int | None = None  # the item it holds

    def describe_death(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit status {code}" if code is not None else "its result pipe broke"
        return f"worker {self.index} (pid {self.process.pid}) died ({how}; out of memory?)"


class OrderedPool:
    def __init__(self, fn: Callable, workers: int, initializer: Callable | None = None, initargs=()):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        ctx = multiprocessing.get_context("fork")
        self._workers: list[_Worker] = []
        try:
            for index in range(workers):
                inherited = [end for w in self._workers for end in (w.tasks, w.results)]
                self._workers.append(_Worker(ctx, index, fn, initializer, initargs, inherited))
        except BaseException:
            self.close()
            raise

    def map(self, items: Iterable) -> Iterator:
        """fn(item) for each item, in order. Raises WorkerDied or WorkerFailed at once."""
        items = iter(items)
        idle = collections.deque(self._workers)
        busy: dict = {}  # result connection -> worker
        done: dict[int, object] = {}
        next_sequence = next_to_yield = 0
        window = 2 * len(self._workers)
        exhausted = False
        while True:
            while idle and not exhausted and next_sequence - next_to_yield < window:
                try:
                    item = next(items)
                except StopIteration:
                    exhausted = True
                    break
                worker = idle.popleft()
                try:
                    worker.tasks.send(item)
                except (BrokenPipeError, ConnectionResetError):
                    raise WorkerDied(worker.describe_death()) from None
                worker.sequence, next_sequence = next_sequence, next_sequence + 1
                busy[worker.results] = worker
            while next_to_yield in done:
                yield done.pop(next_to_yield)
                next_to_yield += 1
            if not busy:
                if exhausted:
                    return
                continue
            sentinels = {w.process.sentinel: w for w in busy.values()}
            ready = multiprocessing.connection.wait([*busy, *sentinels])
            for conn in ready:
                if conn in sentinels:
                    worker = sentinels[conn]
                    # A worker may exit right after sending (never in normal use): read it first.
                    if worker.results not in busy or worker.results.poll():
                        continue
                    raise WorkerDied(worker.describe_death())
                worker = busy.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):  # died mid-message: the pipe has no writer left
                    raise WorkerDied(worker.describe_death()) from None
                if not ok:
                    raise WorkerFailed(f"worker {worker.index} (pid {worker.process.pid}) raised:\n{value}")
                done[worker.sequence] = value
                idle.append(worker)

    def close(self) -> None:
        """Stops every worker at once (they hold nothing worth finishing) and reaps them."""
        for worker in self._workers:
            for conn in (worker.tasks, worker.results):
                conn.close()
            if worker.process.is_alive():
                worker.process.kill()
        for worker in self._workers:
            worker.process.join(timeout=5)
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
