"""Host memory a rank needs to read a checkpoint layout-free for resharding (checkpoint/reshard.py).

    python benchmarks/reshard_memory.py [--num-layers 8 --hidden-size 512]

Saves one step of a GPT under DP=2 x ZeRO-1 (fp32: master weights and Adam's two moments, 12
bytes per parameter in the files), then in a fresh process reads it with
checkpoint/training_state.read_training_state two ways, measuring the growth of anonymous memory
(RssAnon: what the process itself allocated; the memory-mapped files are page cache, shared and
reclaimable):
    held     every tensor copied out and kept (the baseline: a reader that joins the whole state
             first, as this one did before it was made lazy)
    lazy     every tensor looked up one at a time and dropped, as load_resharded takes them: a
             tensor whole in one file is a view of the mapped file, only one split over partitions
             or TP ranks is joined into new memory
The ratio is held / lazy (higher is better). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from megatron_snm.parallel.spawn import run_distributed

VOCAB = 96
FLAGS = ["--seq-length", "16", "--make-vocab-size-divisible-by", "16", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr", "3e-3", "--seed", "7"]


def save_one_step(rank: int, world_size: int, argv: list[str]) -> None:
    """One training step of the real trainer on random tokens, saved (`argv` has --save)."""
    import numpy as np
    import torch

    from megatron_snm.config import parse_args, resolve
    from megatron_snm.training.trainer import build_run

    torch.set_num_threads(1)
    run = resolve(parse_args(argv), world_size)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (run.batch.global_batch_size, run.model.seq_length + 1))
    samples = [{"text": row} for row in tokens]
    build_run(run, VOCAB).train((samples, samples, samples))


def rss_anon() -> int:
    return int(re.search(r"^RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def read(directory: str, keep: bool) -> dict:
    """Peak anonymous-memory growth while reading every tensor of the state (in this process)."""
    from megatron_snm.checkpoint.training_state import read_training_state

    start = rss_anon()
    state = read_training_state(directory)
    maps = [state.weights, *state.moments.values()]
    kept, peak, elements = [], 0, 0
    for name in state.weights:
        for tensors in maps:
            tensor = tensors[name]
            elements += tensor.numel()
            if keep:
                kept.append(tensor.clone())
            peak = max(peak, rss_anon() - start)
            del tensor
    return dict(peak_bytes=peak, state_bytes=4 * elements)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--read", choices=("held", "lazy"), help=argparse.SUPPRESS)  # the measuring subprocess
    p.add_argument("--directory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.read:
        print(json.dumps(read(args.directory, keep=args.read == "held")))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        shape = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                 "--num-attention-heads", "8", "--train-iters", "1", "--lr-warmup-iters", "0", "--eval-iters", "0"]
        run_distributed(save_one_step, 2, FLAGS + shape + ["--zero-stage", "1", "--save", tmp])
        directory = str(Path(tmp) / "iter_0000001")
        figures = {}
        for mode in ("held", "lazy"):
            out = subprocess.run([sys.executable, __file__, "--read", mode, "--directory", directory],
                                 capture_output=True, text=True, check=True).stdout
            figures[mode] = json.loads(out.strip().splitlines()[-1])
            print(f"{mode:>5}: anonymous memory +{figures[mode]['peak_bytes'] / 2**20:8.1f} MiB while reading "
                  f"{figures[mode]['state_bytes'] / 2**20:.1f} MiB of state", flush=True)
    ratio = figures["held"]["peak_bytes"] / max(figures["lazy"]["peak_bytes"], 1)
    print(f"held / lazy: {ratio:.1f}")
    print(json.dumps(dict(benchmark="reshard_memory", **figures, ratio=ratio)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
