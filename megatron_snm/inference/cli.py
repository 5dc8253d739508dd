"""What tools/evaluate.py and tools/generate.py share: the flags that load a checkpoint, checks
that refuse bad input in one line (exit status 2), and the model built on this rank."""
from __future__ import annotations

import argparse
import sys

import torch

from megatron_snm.checkpoint.read import CheckpointError, FullCheckpoint, read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.data.errors import DataError
from megatron_snm.data.tokenizer_description import check_dataset, describe
from megatron_snm.data.vocabulary_check import undescribed_warning
from megatron_snm.parallel.distributed import port_in_use_message
from megatron_snm.parallel.lost_rank import EXIT_LOST_RANK, lost_rank_message

# Shape flags a user may give to say which model they expect; a checkpoint of another is refused.
SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def read_text_lines(path: str, flag: str):
    """(line number, text without its newline) of each line of `path`, decoded as UTF-8; a line
    that is not UTF-8, or a file that cannot be read, is a UsageError naming the file and line."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise UsageError(f"{flag} {path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                     f"column {err.start + 1})") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: {err.strerror}") from None


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint and layout")
    g.add_argument("--load", required=True, help="checkpoint directory (its `latest`), as pretrain_gpt.py --save wrote it")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size to run with (any checkpoint layout)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size to run with")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default: the run's)")
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    for flag in SHAPE_FLAGS:
        g.add_argument("--" + flag.replace("_", "-"), type=int, help="optional: refuse a checkpoint of another value")
    t = parser.add_argument_group("tokenizer (default: the one the run recorded)")
    t.add_argument("--tokenizer-type")
    t.add_argument("--vocab-file")
    t.add_argument("--merge-file")
    t.add_argument("--tokenizer-model")


def load_checkpoint_and_tokenizer(args, need_tokenizer: bool):
    """(checkpoint, (spec, tokenizer) or None), refusing what does not fit with UsageError."""
    try:
        ckpt = read_checkpoint(args.load)
        tokenizer = checkpoint_tokenizer(ckpt, tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
                                         merge_file=args.merge_file, tokenizer_model=args.tokenizer_model)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    if need_tokenizer and tokenizer is None:
        raise UsageError(f"{args.load} records no tokenizer (--tokenizer-type); give --tokenizer-type and its files")
    check_shape(ckpt, args)
    return ckpt, tokenizer


def check_data_tokenizer(prefix: str, ckpt: FullCheckpoint, tokenizer) -> None:
    """Refuses (UsageError) dataset `prefix` when its PREFIX.tokenizer.json names another tokenizer
    than the one in use (`tokenizer`: load_checkpoint_and_tokenizer's (spec, tokenizer) or None);
    warns in one line about a dataset without one whose ids look like a smaller vocabulary's."""
    expected = describe(tokenizer[1], tokenizer[0].tokenizer_model or tokenizer[0].vocab_file) if tokenizer \
        else ckpt.metadata.get("tokenizer")
    try:
        if expected is not None:
            check_dataset(prefix, expected, f"the tokenizer of {ckpt.directory}")
        warning = undescribed_warning(prefix, expected["vocab_size"] if expected else ckpt.vocab_rows)
    except DataError as err:
        raise UsageError(str(err)) from None
    if warning:
        print(warning, file=sys.stderr)


def check_shape(ckpt: FullCheckpoint, args) -> None:
    shape = ckpt.metadata["model_shape"]
    for flag in SHAPE_FLAGS:
        wanted = getattr(args, flag, None)
        if wanted is not None and wanted != shape[flag]:
            raise UsageError(f"{ckpt.directory} holds a model with --{flag.replace('_', '-')} {shape[flag]}, "
                             f"not {wanted}")


def run_tool(name: str, main) -> int:
    """Runs main(), turning UsageError / ValueError into one line on stderr and exit status 2, and
    under a launcher a lost rank or a taken --master_port into one line too (5, 2)."""
    try:
        return main() or 0
    except (UsageError, ValueError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        port_taken = port_in_use_message(err)
        message = port_taken or lost_rank_message(err)
        if message is None:
            raise
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        return 2 if port_taken else EXIT_LOST_RANK
