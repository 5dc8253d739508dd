"""Measured per-rank memory of real training steps against tools/estimate_memory.py's estimate.

    python benchmarks/memory.py                  # small GPTs: ZeRO 0-3, TP=2 (and with SP), PP=2, recompute none/full
    python benchmarks/memory.py --preset 350m    # the 350M preset, seq 512, micro-batch 1, 2 processes,
                                                 # fp32: ZeRO-1 against ZeRO-3 (needs ~10 GB)

Each configuration runs in fresh gloo processes (spawned): the training engine of pretrain_gpt.py
(training/engine.py, built from the same flags) is built and trains --steps global batches on random
tokens. Measured per rank (analysis/memory_measure.py): `tracked`, the peak of torch's live CPU
allocations from before the model is built to after the last step (what the estimate predicts, and
what torch.cuda.max_memory_allocated measures on a GPU), and `rss`, the peak resident set above the
process's own before the build (the operating system's view: adds the allocator's and libraries'
memory, leaves out pages never touched, e.g. most of an unused reduce bucket). `ratio` =
tracked / estimated per rank; the last line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.units import human
from megatron_snm.analysis.memory_measure import measure_run

GPT2_VOCAB = 50257
SMALL = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "256",
         "--micro-batch-size", "2", "--lr", "1e-4", "--train-iters", "3"]
# A Llama-family model of the same size: rotary, RMSNorm, SwiGLU, 2 key/value heads, no biases, untied.
LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--group-query-attention",
         "--num-query-groups", "2", "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
PRESET_350M = ["--model-size", "350m", "--seq-length", "512", "--micro-batch-size", "1", "--lr", "1e-4",
               "--train-iters", "3"]


def small_configs(small_buckets: str) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, flags). `small_buckets` is a DeepSpeed JSON with a 1M-element reduce bucket,
    so the model's own memory and not DeepSpeed's 2 GB default bucket decides ZeRO-1/2's figures."""
    bucketed = ["--deepspeed_config", small_buckets]
    return {
        "zero0 dp2": (2, SMALL + ["--zero-stage", "0"]),
        "zero1 dp2": (2, SMALL + ["--zero-stage", "1"] + bucketed),
        "zero1 dp2 default bucket": (2, SMALL + ["--zero-stage", "1"]),
        "zero2 dp2": (2, SMALL + ["--zero-stage", "2"] + bucketed),
        "zero3 dp2": (2, SMALL + ["--zero-stage", "3"]),
        "tp2": (2, SMALL + ["--tensor-model-parallel-size", "2"]),
        "tp2 sequence parallel": (2, SMALL + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        "pp2": (2, SMALL + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8"]),
        "zero0 dp2 full recompute": (2, SMALL + ["--zero-stage", "0", "--checkpoint-activations"]),
        "tp2 full recompute": (2, SMALL + ["--tensor-model-parallel-size", "2", "--checkpoint-activations"]),
        "llama tp2 sequence parallel": (2, SMALL + LLAMA + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        "llama zero1 dp2": (2, SMALL + LLAMA + ["--zero-stage", "1"] + bucketed),
    }


def _measure(rank, world_size, argv, steps):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return measure_run(argv, GPT2_VOCAB, steps)


def run(world_size: int, argv: list[str], steps: int) -> list[dict]:
    """Each rank's measure_run result, in rank order."""
    return run_distributed(_measure, world_size, argv, steps, timeout=3600)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=("350m",), help="the 350M figure (ZeRO-1 vs ZeRO-3) instead of the small GPTs")
    p.add_argument("--steps", type=int, default=3, help="training steps per configuration")
    p.add_argument("--only", default=None, help="comma-separated names of the small configurations to run")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        small_buckets = os.path.join(tmp, "small_buckets.json")
        with open(small_buckets, "w") as f:
            json.dump({"zero_optimization": {"reduce_bucket_size": 1_000_000}}, f)
        if args.preset:
            configs = {f"350m zero{z} dp2": (2, PRESET_350M + ["--zero-stage", str(z)]) for z in (3, 1)}
        else:
            configs = small_configs(small_buckets)
            if args.only:
                configs = {name: configs[name] for name in args.only.split(",")}
        rows = []
        print(f"{'configuration':<28} {'rank':>4} {'stage':>5} {'estimated':>12} {'tracked':>12} {'ratio':>6} "
              f"{'rss':>12}", flush=True)
        for name, (world, flags) in configs.items():
            for r in run(world, flags, args.steps):
                ratio = r["tracked_bytes"] / r["estimated_bytes"]
                rows.append(dict(configuration=name, **r, ratio=ratio))
                print(f"{name:<28} {r['rank']:>4} {r['stage']:>5} {human(r['estimated_bytes']):>12} "
                      f"{human(r['tracked_bytes']):>12} {ratio:>6.2f} {human(r['rss_bytes']):>12}", flush=True)

    summary = dict(benchmark="memory", rows=rows)
    if args.preset:
        peak = {z: max(r["tracked_bytes"] for r in rows if r["configuration"] == f"350m zero{z} dp2") for z in (1, 3)}
        rss = {z: max(r["rss_bytes"] for r in rows if r["configuration"] == f"350m zero{z} dp2") for z in (1, 3)}
        losses = {z: next(r["losses"] for r in rows if r["configuration"] == f"350m zero{z} dp2") for z in (1, 3)}
        summary.update(zero3_over_zero1_tracked=peak[3] / peak[1], zero3_over_zero1_rss=rss[3] / rss[1],
                       losses_zero1=losses[1], losses_zero3=losses[3],
                       max_loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(losses[3], losses[1])))
        print(f"ZeRO-3 / ZeRO-1 per-rank peak: tracked {summary['zero3_over_zero1_tracked']:.2f}, "
              f"rss {summary['zero3_over_zero1_rss']:.2f}; losses' largest relative difference "
              f"{summary['max_loss_rel_diff']:.2e}")
    summary["ratio"] = max(abs(r["ratio"] - 1) for r in rows) + 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
