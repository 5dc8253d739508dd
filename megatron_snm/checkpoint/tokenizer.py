"""The tokenizer a checkpoint was trained with: copied into it, described, checked.

Each checkpoint holds a copy of the run's tokenizer files under `iter_N/tokenizer/` and records in
megatron_snm.json their description (data/tokenizer_description.py: type, size, end-of-document
id, the fingerprint of the vocabulary) with the copies' paths relative to the checkpoint:

    "tokenizer": {"tokenizer_type": ..., "vocab_size": ..., "eod": ..., "vocabulary_sha256": ...,
                  "files": {"tokenizer_model": "tokenizer/tok.model"}}

so a checkpoint moved or read from any directory brings its tokenizer along. The training side
calls `run_tokenizer` (the record of the run's tokenizer), `save_tokenizer_files` (the copies, in
the checkpoint's manifest) and `check_same_tokenizer` (resuming under another tokenizer is
refused). The tools call `checkpoint_tokenizer`: the copies, or the flags that override them,
which must describe the same vocabulary.

Checkpoints from before the copies record only the flags as given on the training command line;
a relative path that does not exist from the current directory is then looked for by its file
name in the save directory and the directory above it.
"""
from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass

from megatron_snm.checkpoint.read import CheckpointError, FullCheckpoint
from megatron_snm.config import ConfigError
from megatron_snm.data.tokenizer_description import describe, label, same_tokenizer
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


TOKENIZER_DIR = "tokenizer"
_FILES_OF = {"GPT2BPETokenizer": ("vocab_file", "merge_file"), "SentencePieceTokenizer": ("tokenizer_model",),
             "GPTSentencePieceTokenizer": ("tokenizer_model",),
             "HuggingFaceTokenizer": ("tokenizer_model",)}
# A Hugging Face tokenizer given as a directory: the files of it that the tokenizer reads.
_HF_DIRECTORY_FILES = ("tokenizer.json", "tokenizer_config.json")


def run_tokenizer(args: dict) -> dict | None:
    """What a checkpoint records of the run's tokenizer (`args`: the run's flags by name), None for
    a run without one."""
    if not args.get("tokenizer_type"):
        return None
    sources = tuple((k, args.get(k)) for k in _FILES_OF.get(args["tokenizer_type"], ()))
    stamps = tuple(os.stat(path).st_mtime_ns if path and os.path.exists(path) else None for _, path in sources)
    return _record(args["tokenizer_type"], sources, stamps, args.get("vocab_size"))


@functools.lru_cache(maxsize=4)
def _record(tokenizer_type: str, sources: tuple, stamps: tuple, vocab_size: int | None = None) -> dict:
    del stamps  # part of the cache key only: a file changed on disk is described afresh
    values = dict(sources)
    tokenizer = build_tokenizer(tokenizer_type, vocab_size=vocab_size, **values)  # NullTokenizer's --vocab-size
    files = {k: f"{TOKENIZER_DIR}/{os.path.basename(os.path.normpath(v))}" for k, v in sources if v}
    return dict(describe(tokenizer, values.get("tokenizer_model") or values.get("vocab_file")), files=files)


def save_tokenizer_files(writer, checkpoint_dir: str, metadata: dict) -> None:
    """Copies the run's tokenizer files (named by metadata["args"]) to where metadata["tokenizer"]
    says, through `writer` (the checkpoint engine: the copies enter the manifest). Rank 0."""
    record = metadata.get("tokenizer")
    if not record:
        return
    for field, relative in record["files"].items():
        source, target = metadata["args"][field], os.path.join(checkpoint_dir, relative)
        copies = [(source, target)]
        if os.path.isdir(source):  # a Hugging Face tokenizer's directory
            copies = [(os.path.join(source, n), os.path.join(target, n)) for n in _HF_DIRECTORY_FILES]
        elif record["tokenizer_type"] == "HuggingFaceTokenizer":  # its tokenizer.json: the config beside it says eos
            name = _HF_DIRECTORY_FILES[1]
            copies.append((os.path.join(os.path.dirname(source), name), os.path.join(os.path.dirname(target), name)))
        for src, dst in copies:
            if src == source or os.path.isfile(src):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                writer.write(dst, functools.partial(shutil.copyfile, src, dst))


def check_same_tokenizer(saved: dict, current: dict, checkpoint_dir: str) -> None:
    """Refuses (ConfigError) to resume a checkpoint trained with another tokenizer than the run's."""
    was, now = saved.get("tokenizer"), current.get("tokenizer")
    if was and now and not same_tokenizer(was, now):
        raise ConfigError(f"checkpoint {checkpoint_dir} was trained with {label(was)}, but this run's tokenizer "
                          f"(--tokenizer-type and its files) is {label(now)}; give the checkpoint's tokenizer "
                          f"(a copy is in {os.path.join(checkpoint_dir, TOKENIZER_DIR)})")


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
    args, record = ckpt.metadata["args"], ckpt.metadata.get("tokenizer")
    overridden = any(overrides.get(k) for k in TOKENIZER_FIELDS)
    if record and not overridden:
        spec = TokenizerSpec(record["tokenizer_type"], **{k: os.path.join(ckpt.directory, v)
                                                           for k, v in record["files"].items()},
                             vocab_size=args.get("vocab_size"))
    else:
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
    if record and overridden:
        given = describe(tokenizer, spec.tokenizer_model or spec.vocab_file)
        if not same_tokenizer(given, record):
            raise CheckpointError(f"the tokenizer given, {label(given)}, is not the one {ckpt.directory} was trained "
                                  f"with, {label(record)} (its copy is in "
                                  f"{os.path.join(ckpt.directory, TOKENIZER_DIR)}; give no tokenizer flags to use it)")
    return spec, tokenizer
