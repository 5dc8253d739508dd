"""The tokenizer a checkpoint was trained with: recorded in its arguments, checked against its
vocabulary.

A run records `--tokenizer-type` and its files as given on its command line. A relative path
that does not exist from the current directory is looked for by its file name in the save
directory and the directory above it (where the demo keeps its tokenizer); flags of the tools
override the recorded values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_snm.checkpoint.read import CheckpointError, FullCheckpoint
from megatron_snm.data.tokenizers import Tokenizer, build_tokenizer
from megatron_snm.model.config import padded_vocab_size

TOKENIZER_FIELDS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")


@dataclass(frozen=True)
class TokenizerSpec:
    tokenizer_type: str
    vocab_file: str | None = None
    merge_file: str | None = None
    tokenizer_model: str | None = None
    vocab_size: int | None = None  # NullTokenizer's --vocab-size

    def build(self) -> Tokenizer:
        return build_tokenizer(self.tokenizer_type, self.vocab_file, self.merge_file, self.tokenizer_model,
                               self.vocab_size)


def _locate(path: str | None, ckpt: FullCheckpoint) -> str | None:
    if path is None or os.path.exists(path) or os.path.isabs(path):
        return path
    save_dir = os.path.dirname(os.path.abspath(ckpt.directory))
    for base in (save_dir, os.path.dirname(save_dir)):
        candidate = os.path.join(base, os.path.basename(path))
        if os.path.exists(candidate):
            return candidate
    return path


def checkpoint_tokenizer(ckpt: FullCheckpoint, **overrides) -> tuple[TokenizerSpec, Tokenizer] | None:
    """The checkpoint's tokenizer (None if it records none and no override names one), checked to
    fit the embedding table: its vocabulary padded as the run padded it must give the table's rows."""
    args = ckpt.metadata["args"]
    values = {k: overrides.get(k) or args.get(k) for k in TOKENIZER_FIELDS}
    if not values["tokenizer_type"]:
        return None
    spec = TokenizerSpec(**{k: (v if k in ("tokenizer_type", "vocab_size") else _locate(v, ckpt))
                            for k, v in values.items()})
    try:
        tokenizer = spec.build()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"tokenizer of {ckpt.directory}: {err} (override with --tokenizer-type / "
                              "--vocab-file / --merge-file / --tokenizer-model)") from None
    tp = ckpt.metadata["parallel"]["tensor_model_parallel_size"]
    divisible_by = args.get("make_vocab_size_divisible_by", 128)
    if padded_vocab_size(tokenizer.vocab_size, tp, divisible_by) != ckpt.vocab_rows:
        raise CheckpointError(
            f"the tokenizer ({spec.tokenizer_type} {spec.tokenizer_model or spec.vocab_file}) has "
            f"{tokenizer.vocab_size} tokens, which padded for TP {tp} gives "
            f"{padded_vocab_size(tokenizer.vocab_size, tp, divisible_by)} rows, but {ckpt.directory}'s embedding "
            f"table has {ckpt.vocab_rows}: not the tokenizer this model was trained with")
    return spec, tokenizer
