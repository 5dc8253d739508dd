"""Predict a training run's memory per rank before launching it.

    python tools/estimate_memory.py <pretrain_gpt.py's flags> --world-size 8 [--device-memory 80GB]

Takes the same flags as pretrain_gpt.py (data and tokenizer flags may be left out), prints per
pipeline stage the bytes of each component (training/memory_estimate.py says what each counts), and
last one JSON object: `per_rank_bytes` (the largest over ranks), `stages`, and with --device-memory
`fits`. Exit status 0, or 2 for a bad configuration (nothing estimated).
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_snm.config import ConfigError, build_parser, parse_args, resolve
from megatron_snm.training import memory_estimate as mem
from megatron_snm.training.zero3 import apply_zero_defaults

GPT2_VOCAB = 50257


def _own_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="estimate_memory.py", add_help=False, usage=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--world-size", type=int, required=True, help="processes of the run (GPUs)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"the tokenizer's vocabulary (default: --tokenizer-type's, else GPT-2's {GPT2_VOCAB})")
    return parser


_LENGTH_FLAGS = ("--train-iters", "--train-samples", "--train-tokens")


def _vocab_size(run, given: int | None) -> int:
    if given is not None:
        return given
    data = run.data
    if data.tokenizer_type:
        from megatron_snm.data.tokenizers import build_tokenizer
        return build_tokenizer(data.tokenizer_type, data.vocab_file, data.merge_file, data.tokenizer_model).vocab_size
    return GPT2_VOCAB


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip() + "\n\n" + _own_parser().format_help().split("\n", 1)[1]
              + "\ntraining flags (as pretrain_gpt.py):\n" + build_parser().format_help().split("\n\n", 2)[2])
        return 0
    own, training_argv = _own_parser().parse_known_args(argv)
    try:
        if own.world_size < 1:
            raise ConfigError(f"--world-size must be >= 1, got {own.world_size}")
        if not any(arg.split("=")[0] in _LENGTH_FLAGS for arg in training_argv):
            training_argv = [*training_argv, "--train-iters", "1"]  # the length of training does not change memory
        run = resolve(parse_args(training_argv), own.world_size)
        vocab_size = _vocab_size(run, own.vocab_size)
        ds_config = apply_zero_defaults(run.deepspeed, run.model_config(vocab_size), run.dims.tensor)
        estimate = mem.estimate_memory(mem.plan_from_config(run, vocab_size, ds_config))
        device = mem.parse_bytes(run.parallel.device_memory) if run.parallel.device_memory else None
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
