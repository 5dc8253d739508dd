"""Runs the training loop in-process on N gloo ranks (megatron_snm/parallel/spawn.py), several
configurations per launched job to pay DeepSpeed's start-up once.

    losses = run_configs(world_size, [argv1, argv2, ...])   # per config: rank 0's TrainResult
    python -m tests.training_harness ARGS...                # one process, one config (for kill tests)

Data: a fixed random-token corpus cut into samples (the loop only sees indexable samples of
seq_length + 1 tokens; the dataset builders have their own tests).
"""
from __future__ import annotations

import os

import numpy as np

from megatron_snm.parallel.spawn import run_distributed

# Faults a test injects into the runs of this harness (training/fault_injection.py), by environment
# variable so that a run launched as a subprocess gets them too:
INJECT_LOSS_ENV = "MEGATRON_SNM_TEST_INJECT_LOSS"     # "4:nan,8:50": the loss of iteration 4 x NaN, of 8 x 50
SLEEP_IN_SAVE_ENV = "MEGATRON_SNM_TEST_SLEEP_IN_SAVE"  # "6:120": sleep 120 s in the save of iteration 6,
                                                       # before it is published (to kill a run mid-save)


def _pairs(spec: str) -> dict[int, float]:
    return {int(it): float(value) for it, value in (item.split(":") for item in spec.split(",") if item)}


def injected_faults():
    from megatron_snm.training.fault_injection import FaultInjection

    return FaultInjection(_pairs(os.environ.get(INJECT_LOSS_ENV, "")), _pairs(os.environ.get(SLEEP_IN_SAVE_ENV, "")))

VOCAB = 96
SEQ = 16

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
        "--make-vocab-size-divisible-by", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", "10", "--lr", "3e-3", "--lr-warmup-iters", "2", "--min-lr", "3e-4",
        "--weight-decay", "0.1", "--clip-grad", "0.5", "--log-interval", "5", "--eval-interval", "5",
        "--eval-iters", "1", "--seed", "7"]


def token_samples(count: int, seed: int, vocab: int = VOCAB, first: int = 0, multiplier: int = 5) -> list[dict]:
    """Samples from a learnable stream: each token is a noisy function of the previous one
    (mostly (previous x multiplier + 3) mod vocab)."""
    rng = np.random.default_rng(seed)
    stream = np.empty(count * SEQ + 1, dtype=np.int64)
    stream[0] = first
    for i in range(1, len(stream)):
        stream[i] = (stream[i - 1] * multiplier + 3) % vocab if rng.random() < 0.8 else rng.integers(vocab)
    return [{"text": stream[i * SEQ: (i + 1) * SEQ + 1]} for i in range(count)]


def _body(rank, world_size, runs, vocab=VOCAB, data=token_samples):
    import torch

    from megatron_snm.config import ConfigError, parse_args, resolve
    from megatron_snm.parallel import state
    from megatron_snm.checkpoint.errors import CheckpointError
    from megatron_snm.training.trainer import build_run

    torch.set_num_threads(1)  # 2 shared cores: OpenMP spinning across ranks costs 20x
    results = []
    for argv in runs:
        run = resolve(parse_args(argv), world_size)
        samples = run.batch.train_iters * run.batch.global_batch_size
        eval_samples = run.eval.eval_iters * run.batch.global_batch_size
        datasets = (data(samples, 1), data(eval_samples, 2), data(eval_samples, 3))
        try:
            results.append(build_run(run, vocab, injected_faults()).train(datasets))
        except (ConfigError, CheckpointError) as err:  # e.g. a refused checkpoint: returned for the test to inspect
            results.append(err)
        finally:
            state.destroy_model_parallel()
    return results


def run_configs(world_size: int, runs: list[list[str]], vocab: int = VOCAB, data=token_samples):
    """Each config's TrainResult (or ConfigError / CheckpointError) as seen by rank 0. `data(count,
    seed)` makes the samples (a module-level function, or a partial of one, so it can be pickled):
    seed 1 for training, 2 for validation, 3 for test."""
    return run_distributed(_body, world_size, runs, vocab, data)[0]


if __name__ == "__main__":
    import sys

    from megatron_snm.parallel.spawn import free_port
    from megatron_snm.training.exit_conditions import EXIT_CODES, EXIT_CONFIG

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    result = _body(0, 1, [sys.argv[1:]])[0]
    if isinstance(result, Exception):
        print(f"training_harness: error: {result}", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_CODES[result.stopped])
