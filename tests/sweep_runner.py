"""The runner the adversarial sweeps share (tests/adversarial_*_sweep.py): each case gets a fresh
work directory and returns (outcome, detail); one line per case, then the counts as a JSON line."""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil
import sys
import tempfile
import time


def run_sweep(cases: list, description: str, prefix: str) -> int:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args()
    root = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix=prefix))
    counts = collections.Counter()
    for k, (name, fn) in enumerate(cases):
        work = root / f"case{k:02d}"
        work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            outcome, detail = fn(work)
        except Exception as e:  # the sweep itself tripped: count it against us
            outcome, detail = "traceback", f"{type(e).__name__}: {e}"
        counts[outcome] += 1
        print(f"{outcome:13s} {time.monotonic() - start:5.1f}s  {name}: {detail}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"cases": sum(counts.values()), **counts}))
    sys.stdout.flush()
    return 0
