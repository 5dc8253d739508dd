#!/usr/bin/env python
"""Converts between our checkpoints and Hugging Face `transformers` GPT-2 and Llama directories.

    python tools/convert_checkpoint.py --to hf --load CKPT_DIR --output HF_DIR
    python tools/convert_checkpoint.py --from hf --input HF_DIR --save CKPT_DIR \
        [--tensor-model-parallel-size T --pipeline-model-parallel-size P]

--to hf reads a checkpoint of any layout (TP, PP, ZeRO 0-3) and writes config.json, safetensors
weights (sharded with an index above --max-shard-size), the tokenizer and generation_config.json:
a LlamaForCausalLM for rotary checkpoints (every embedding mode folded into the input table), a
GPT2LMHeadModel for learned positions, where `--embedding-norm layernorm` models also get their
model class (load with trust_remote_code=True).
--from hf writes a weights-only checkpoint of a GPT2LMHeadModel or LlamaForCausalLM for the given
layout that `pretrain_gpt.py --load` starts from (fresh optimizer, iteration 0; pass the
architecture flags the import prints: --openai-gelu for GPT-2's GELU, Llama's rotary, RMSNorm,
SwiGLU and query-group flags).
Our checkpoints need no conversion to change layout: `pretrain_gpt.py --load CKPT` under another
TP / PP / DP size or ZeRO stage reshards the weights and Adam's state as it loads.
Exit status 2 on bad input, with one line saying what is wrong.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_snm.checkpoint.read import CheckpointError
from megatron_snm.inference.cli import DTYPES, load_checkpoint_and_tokenizer, run_tool


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=("hf",), help="export our checkpoint (--load) to --output")
    direction.add_argument("--from", dest="from_", choices=("hf",), help="import --input into --save")
    p.add_argument("--load", help="--to hf: our checkpoint directory")
    p.add_argument("--output", help="--to hf: the Hugging Face directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="--to hf: dtype of the weights (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="--to hf: safetensors shard size (default 5GB)")
    p.add_argument("--input", help="--from hf: a GPT2LMHeadModel or LlamaForCausalLM directory")
    p.add_argument("--save", help="--from hf: our checkpoint directory to write")
    p.add_argument("--seq-length", type=int, help="--from hf: the --seq-length the checkpoint records (default: the "
                   "model's positions, n_positions or max_position_embeddings)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    for flag in ("--tokenizer-type", "--vocab-file", "--merge-file", "--tokenizer-model"):
        p.add_argument(flag, help="--to hf: override the tokenizer the run recorded")
    args = p.parse_args(argv)
    needed = ("load", "output") if args.to else ("input", "save")
    for name in needed:
        if getattr(args, name) is None:
            p.error(f"--{'to' if args.to else 'from'} hf needs --{name}")
    return args


def check_new_directory(flag: str, path: str) -> None:
    """Before any work: `path` must be absent or an empty directory (never replaced, never a link)."""
    if os.path.islink(path):
        raise ValueError(f"{flag} {path} is a symbolic link; give the directory to write itself (it must not exist "
                         "or be empty)")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} exists and is not a directory; remove it or choose another directory")
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"{flag} {path} exists and is not empty; remove it or choose another directory")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag} {path}: {ancestor} is not a directory")


def export(args) -> None:
    from megatron_snm.hf.export import export_to_hf, hf_family

    check_new_directory("--output", args.output)
    start = time.perf_counter()
    ckpt, tokenizer = load_checkpoint_and_tokenizer(args, need_tokenizer=False)
    hf_family(ckpt.gpt_config())  # an architecture transformers cannot hold: refused before anything else
    if tokenizer is None:
        print(f"convert_checkpoint.py: warning: {args.load} records no tokenizer; writing the model without "
              "tokenizer files (give --tokenizer-type and its files to include them)", file=sys.stderr)
    try:
        kind = export_to_hf(ckpt, args.output, tokenizer, DTYPES[args.dtype] if args.dtype else None,
                            args.max_shard_size)
    except OSError as err:  # nothing of ours is left; what is at --output is as it was
        check_new_directory("--output", args.output)  # something appeared there while we wrote
        raise ValueError(f"--output {args.output}: cannot write it ({err.strerror}"
                         f"{': ' + err.filename if err.filename else ''})") from None
    mode = ckpt.gpt_config().embedding_norm
    print(f"convert_checkpoint.py: wrote {args.output} ({kind}) from {ckpt.directory} (iteration {ckpt.iteration}, "
          f"embedding norm {mode}) in {time.perf_counter() - start:.1f} s"
          + ("; load it with trust_remote_code=True" if kind == "GPT2EmbedLNLMHeadModel" else ""))


def import_(args) -> None:
    from megatron_snm.hf.import_hf import import_from_hf

    start = time.perf_counter()
    try:
        path = import_from_hf(args.input, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.seq_length)
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    print(f"convert_checkpoint.py: wrote {path} (TP {args.tensor_model_parallel_size}, PP "
          f"{args.pipeline_model_parallel_size}) from {args.input} in {time.perf_counter() - start:.1f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool("convert_checkpoint.py", lambda: export(args) if args.to else import_(args))


if __name__ == "__main__":
    sys.exit(main())
