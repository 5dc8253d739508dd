"""How long a checkpoint save blocks the training loop: synchronous against --async-save.

    python benchmarks/checkpoint_save.py [--num-layers 12 --hidden-size 1024] [--save-dir DIR]

One process, ZeRO-0 fp32 (weights + Adam moments: 12 bytes per parameter in the files). For each
mode the trainer takes one step, then saves: `blocked` is the time until the loop could take its
next step (sync: the whole save; async: the copy to CPU memory), `published` the time until
`latest` names the checkpoint (async: while the loop keeps training). The ratio is sync blocked /
async blocked (higher is better). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time

import torch

from megatron_snm.parallel.spawn import run_distributed

VOCAB = 32000


def _body(rank, world, args):
    from megatron_snm.config import parse_args, resolve
    from megatron_snm.checkpoint.save_load import start_checkpoint
    from megatron_snm.training.trainer import build_run

    flags = parse_args(["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
                        "--num-attention-heads", "16", "--seq-length", "128", "--micro-batch-size", "1",
                        "--train-iters", "100", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1000"])
    trainer = build_run(resolve(flags, world), VOCAB)
    tokens = torch.randint(0, VOCAB, (1, 129))
    batches = itertools.repeat((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    params = sum(p.numel() for p in trainer.engine.model.parameters())
    figures = {"parameters": params}
    for mode in ("sync", "async"):
        trainer.step(batches)
        directory = os.path.join(args.save_dir, mode)
        start = time.perf_counter()
        pending = start_checkpoint(trainer.engine.ds, directory, trainer.iteration, trainer._metadata(),
                                   asynchronous=mode == "async")
        blocked = time.perf_counter() - start
        steps = 0
        while mode == "async" and not pending.written_everywhere():
            trainer.step(batches)  # the loop goes on while the files are written
            steps += 1
        path = pending.finish()
        published = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        figures[mode] = dict(blocked_s=blocked, published_s=published, bytes=size, steps_during_write=steps)
        print(f"[{mode:5}] {size / 2**30:.2f} GiB: loop blocked {blocked:.2f} s, published after {published:.2f} s"
              + (f" ({steps} training steps ran meanwhile)" if mode == "async" else ""), flush=True)
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--save-dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args(argv)
    root = args.save_dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    args.save_dir = root
    try:
        figures = run_distributed(_body, 1, args, timeout=3600)[0]
    finally:
        if not argv or "--save-dir" not in argv:
            shutil.rmtree(root, ignore_errors=True)
    figures["ratio"] = figures["sync"]["blocked_s"] / figures["async"]["blocked_s"]
    print(f"{figures['parameters'] / 1e6:.0f}M parameters; sync blocked / async blocked = {figures['ratio']:.1f}")
    print(json.dumps({"benchmark": "checkpoint_save", **figures}))


if __name__ == "__main__":
    main()
