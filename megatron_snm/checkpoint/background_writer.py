"""Checkpoint files written by a background thread (`--async-save`), after a copy in CPU memory.

The training loop is blocked only for the copy: the next steps change the model while the files
are written. The thread runs plain file writes and never a collective; the trainer publishes the
checkpoint (save_load.PendingSave) once every rank's writes are done.
"""
from __future__ import annotations

import queue
import threading

import torch


def cpu_copy(obj):
    """`obj` with every tensor copied to CPU memory (containers rebuilt, other values kept)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        threading.Thread(target=self._run, name="checkpoint-writer", daemon=True).start()

    def submit(self, job) -> None:
        with self._lock:
            self._pending += 1
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()  # records its own errors (SafeCheckpointEngine._write)
            finally:
                with self._lock:
                    self._pending -= 1
                    self._done.notify_all()

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def wait(self) -> None:
        with self._lock:
            self._done.wait_for(lambda: self._pending == 0)
