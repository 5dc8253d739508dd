"""Tiny trained checkpoints with a real tokenizer, for the export / import / evaluation / generation
tests: one 2-process gloo job trains each configuration 2 steps (tests/training_harness.py: the real
trainer) and saves it, so the tests read checkpoints exactly as training writes them.

    ckpts = build_checkpoints(tmp_dir)   # name -> Trained(save_dir, result, test_samples)
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from tests.conftest import SAMPLE_DIR
from tests.training_harness import SEQ, run_configs, token_samples as harness_samples

TOKENIZER_VOCAB = 500  # padded to 512: the padding rows are exercised

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
        "--make-vocab-size-divisible-by", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "2", "--lr", "3e-3", "--lr-warmup-iters", "1", "--weight-decay", "0.1",
        "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1", "--seed", "3",
        "--tokenizer-type", "SentencePieceTokenizer"]

# name -> extra flags. Every embedding mode from a TP=2 checkpoint; PP=2 and ZeRO-3 (DP=2) too;
# untied output tables and --max-position-embeddings > --seq-length under TP=2 and PP=2.
CONFIGS = {
    **{f"tp2-{mode}": ["--tensor-model-parallel-size", "2", "--embedding-norm", mode]
       for mode in ("none", "layernorm", "scaled", "detach")},
    "pp2-layernorm": ["--pipeline-model-parallel-size", "2", "--embedding-norm", "layernorm"],
    "pp2-scaled": ["--pipeline-model-parallel-size", "2", "--embedding-norm", "scaled"],
    "zero3-layernorm": ["--zero-stage", "3", "--embedding-norm", "layernorm"],
    # The output layer's own table, and a position table longer than the sequence (issue 17's bugs).
    "tp2-untied-longpos": ["--tensor-model-parallel-size", "2", "--embedding-norm", "layernorm",
                           "--untie-embeddings-and-output-weights", "--max-position-embeddings", "24"],
    "pp2-untied-scaled": ["--pipeline-model-parallel-size", "2", "--embedding-norm", "scaled",
                          "--untie-embeddings-and-output-weights", "--max-position-embeddings", "24"],
}
UNTIED = {name for name, flags in CONFIGS.items() if "--untie-embeddings-and-output-weights" in flags}


@dataclass
class Trained:
    save_dir: str
    test_loss: float          # the loop's loss on test_samples with the saved weights
    test_samples: np.ndarray  # [n, SEQ + 1]


def token_samples(count: int, seed: int, vocab: int) -> list[dict]:
    """The training harness's learnable stream over `vocab` tokens (its own start and multiplier)."""
    return harness_samples(count, seed, vocab, first=5, multiplier=7)


def train_runs(runs: list[list[str]], vocab: int) -> list:
    """Each run's TrainResult (or ConfigError) on 2 gloo processes, as rank 0 saw it; the data are
    token_samples(..., seed 1) for training and seed 3 for the test loss."""
    return run_configs(2, runs, vocab, functools.partial(token_samples, vocab=vocab))


def train_tokenizer(path_prefix: str, vocab_size: int = TOKENIZER_VOCAB) -> str:
    import subprocess
    import sys

    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(SAMPLE_DIR / "c4-train.00000-of-00001.json.gz"),
                    "--model-prefix", path_prefix, "--vocab-size", str(vocab_size), "--workers", "1"],
                   check=True, capture_output=True)
    return path_prefix + ".model"


def build_checkpoints(root: str, configs: dict[str, list[str]] = CONFIGS) -> dict[str, Trained]:
    tokenizer = train_tokenizer(os.path.join(root, "sp"))
    runs = [BASE + ["--tokenizer-model", tokenizer, "--save", os.path.join(root, name)] + flags
            for name, flags in configs.items()]
    results = train_runs(runs, TOKENIZER_VOCAB)
    test = np.stack([s["text"] for s in token_samples(4, 3, TOKENIZER_VOCAB)])
    return {name: Trained(os.path.join(root, name), r.test_loss, test) for name, r in zip(configs, results)}
