"""The data a run has skipped: `SAVE_DIR/skipped_data.jsonl`, one JSON object per skipped range.

    {"reason": "rollback", "diverged_at": 57, "checkpoint": "iter_0000050",
     "iterations": [51, 67], "samples": [400, 536], "documents": [{"dataset": ..., "documents": [...]}, ...]}

`iterations` [first, last] are skipped iterations: their global batches are read and dropped
without training (Megatron-LM's --iterations-to-skip), so `samples` [start, end) are exact
training-sample indices (the sampler reads the training set in order). A relaunch reads the ledger
and never trains on those batches again, from whichever checkpoint it resumes.
"""
from __future__ import annotations

import json
import os

LEDGER = "skipped_data.jsonl"


def read_ledger(save_dir: str | None) -> list[dict]:
    path = os.path.join(save_dir, LEDGER) if save_dir else None
    if not path or not os.path.isfile(path):
        return []
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except ValueError as err:
                    raise ValueError(f"{path}:{number}: not a JSON object ({err})") from None
    return entries


def append_ledger(save_dir: str, entry: dict) -> None:
    """Appends one entry durably (call on one rank)."""
    with open(os.path.join(save_dir, LEDGER), "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ledger_iterations(entries: list[dict]) -> set[int]:
    return {it for entry in entries for it in range(entry["iterations"][0], entry["iterations"][1] + 1)}
