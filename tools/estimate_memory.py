"""Predict a training run's memory per rank before launching it.

    python tools/estimate_memory.py <pretrain_gpt.py's flags> --world-size 8 [--device-memory 80GB]

Takes the same flags as pretrain_gpt.py (data and tokenizer flags may be left out), prints per
pipeline stage the bytes of each component (training/memory_estimate.py says what each counts), and
last one JSON object: `per_rank_bytes` (the largest over ranks), `stages`, and with --device-memory
`fits`. Exit status 0, or 2 for a bad configuration (nothing estimated).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from megatron_snm.config import Config, ConfigError, parse_args
from megatron_snm.training import memory_estimate as mem
from megatron_snm.training.zero3 import apply_zero_defaults

GPT2_VOCAB = 50257


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--world-size", type=int, required=True, help="processes of the run (GPUs)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"the tokenizer's vocabulary (default: --tokenizer-type's, else GPT-2's {GPT2_VOCAB})")
    # Estimator inputs the training parser may not know yet; it wins where it does.
    known = {f.name for f in dataclasses.fields(Config)}
    if "recompute_granularity" not in known:
        parser.add_argument("--recompute-granularity", choices=mem.RECOMPUTE_GRANULARITIES, default=None)
    if "sequence_parallel" not in known:
        parser.add_argument("--sequence-parallel", action="store_true", default=False)
    if "device_memory" not in known:
        parser.add_argument("--device-memory", default=None, help="e.g. 80GB or 141GiB")
    return parser


def training_config(argv: list[str]):
    """The run's Config from pretrain_gpt.py's flags (the one place this tool calls config.py)."""
    return parse_args(argv)


def _vocab_size(cfg, given: int | None) -> int:
    if given is not None:
        return given
    if cfg.tokenizer_type:
        from megatron_snm.data.tokenizers import build_tokenizer
        return build_tokenizer(cfg.tokenizer_type, cfg.vocab_file, cfg.merge_file, cfg.tokenizer_model).vocab_size
    return GPT2_VOCAB


def main(argv: list[str] | None = None) -> int:
    own, training_argv = _own_parser().parse_known_args(argv)
    try:
        if own.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {own.world_size}")
        cfg = training_config(training_argv)
        for name in ("recompute_granularity", "sequence_parallel", "device_memory"):
            if hasattr(own, name):
                setattr(cfg, name, getattr(own, name))
        if cfg.train_iters is None and cfg.train_tokens is None:
            cfg.train_iters = 1  # the length of training does not change the memory
        cfg.validate(own.world_size)
        vocab_size = _vocab_size(cfg, own.vocab_size)
        ds_config = apply_zero_defaults(cfg.build_deepspeed_config(own.world_size), cfg.gpt_config(vocab_size),
                                          cfg.tensor_model_parallel_size)
        estimate = mem.estimate_memory(mem.plan_from_config(cfg, own.world_size, vocab_size, ds_config))
        device = mem.parse_bytes(cfg.device_memory) if cfg.device_memory else None
    except (ConfigError, ValueError, OSError) as err:
        print(f"estimate_memory.py: error: {err}", file=sys.stderr)
        return 2
    print(mem.format_table(estimate))
    summary = dict(per_rank_bytes=estimate.per_rank_bytes,
                   stages=[dict(stage=s.stage, peak_bytes=s.peak_bytes, parameters=s.parameters,
                                persistent=s.persistent, backward_pass=s.backward_pass,
                                optimizer_step=s.optimizer_step) for s in estimate.stages])
    if device is not None:
        summary.update(device_memory_bytes=device, fits=estimate.per_rank_bytes <= device)
        print(("fits: " if summary["fits"] else "does not fit: ") + (
            mem.one_line(estimate) if summary["fits"] else mem.advice(estimate)))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
