#!/usr/bin/env python
"""Trains a SentencePiece tokenizer on JSON-lines shards, for `--tokenizer-type SentencePieceTokenizer`.

    python tools/train_tokenizer.py --input data/sample --model-prefix out/sp8k --vocab-size 8000

writes `out/sp8k.model` (and `out/sp8k.vocab`, the pieces as text); an existing tokenizer there is
replaced only with `--overwrite`. The model is lossless:
no text normalisation, whitespace and newlines kept, unknown characters spelled as UTF-8 bytes,
so `detokenize(tokenize(text)) == text`. The end-of-document id is the `</s>` piece (id 2).
The bundled sample (0.86 MB) trains in about a second with the default BPE model.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


from megatron_snm.data.json_lines import SUFFIXES, SkipLog, expand_inputs, parse_line, read_chunks

# SentencePiece trains on "sentences" of bounded length; documents are cut at line ends into
# pieces of at most this many characters (a longer single line is cut short, for training only).
PIECE_CHARS = 4000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help=f"files, globs or directories of {', '.join(SUFFIXES)} JSON lines")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text to train on (default: text)")
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces, special tokens included (default 8000)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                   help="bpe (default; trains ~10x faster) or unigram")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on a random sample of at most this many text pieces, to bound memory")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="training threads")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PREFIX.model / PREFIX.vocab (the old one stays until the new one "
                        "is trained)")
    args = p.parse_args(argv)
    if args.vocab_size < 260:
        p.error("--vocab-size must be at least 260 (256 byte pieces plus <unk>, <s>, </s>)")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def text_pieces(files, keys, skipped: SkipLog, counted: list[int]):
    """Every document's text under `keys`, cut at line ends into pieces of <= PIECE_CHARS;
    counted[0] is the number of pieces given so far."""
    for chunk in read_chunks(files):
        for lineno, raw in chunk.lines():
            parsed = parse_line(raw, keys)
            if isinstance(parsed, str):
                skipped.add(parsed, f"{chunk.path}:{lineno}")
                continue
            for text in parsed or ():
                piece = ""
                for line in text.splitlines(keepends=True):
                    if piece and len(piece) + len(line) > PIECE_CHARS:
                        counted[0] += 1
                        yield piece
                        piece = ""
                    piece += line[:PIECE_CHARS]
                if piece:
                    counted[0] += 1
                    yield piece
        for reason, where in chunk.skips:
            skipped.add(reason, where)


def check_output(args) -> None:
    """Before any work: an existing tokenizer at --model-prefix is replaced only with --overwrite
    (as preprocess_data.py and merge_datasets.py treat an existing dataset)."""
    existing = [args.model_prefix + ext for ext in (".model", ".vocab") if os.path.lexists(args.model_prefix + ext)]
    if existing and not args.overwrite:
        raise ValueError(f"--model-prefix {args.model_prefix}: {existing[0]} already exists; pass --overwrite to "
                         "replace it, or choose another --model-prefix")
    for path in existing:
        if os.path.isdir(path):
            raise ValueError(f"--model-prefix {args.model_prefix}: {path} is a directory")


def train(args) -> SkipLog:
    import sentencepiece

    files = expand_inputs(args.input)
    check_output(args)
    directory = os.path.dirname(os.path.abspath(args.model_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--model-prefix {args.model_prefix}: cannot create {directory} ({err.strerror}: "
                         f"{err.filename})") from None
    tmp_prefix = f"{args.model_prefix}.tmp-{os.getpid()}"
    skipped = SkipLog()
    counted = [0]
    try:
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=text_pieces(files, tuple(args.json_keys), skipped, counted),
                model_prefix=tmp_prefix,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                # Lossless: keep the text as it is (no NFKC, no whitespace squeezing), bytes for the rest.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                byte_fallback=True,
                split_digits=True,
                character_coverage=0.9999,
                max_sentence_length=4 * PIECE_CHARS + 16,  # bytes; a piece is <= PIECE_CHARS characters
                input_sentence_size=args.max_sentences,
                shuffle_input_sentence=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=args.workers,
                minloglevel=2,
            )
        except RuntimeError as err:
            if counted[0] == 0:  # SentencePiece's own words for it: "INTERNAL: ... [!sentences_.empty()]"
                raise ValueError(no_text_message(files, args.json_keys, skipped)) from None
            # "INTERNAL: src/trainer_interface.cc(638) [condition] What happened." -> what happened.
            said = re.sub(r"^INTERNAL: \S+ \[.*?\] ", "", str(err).strip())
            raise ValueError(f"SentencePiece refused --vocab-size {args.vocab_size} on this input: {said}"
                             if "vocab_size" in said else f"SentencePiece: {said}") from None
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, args.model_prefix + ext)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return skipped


def no_text_message(files, keys, skipped: SkipLog) -> str:
    """Why there was nothing to train on: the files and, where lines were skipped, why and where."""
    named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    why = "; ".join(skipped.lines()) if skipped.total else "no lines"
    return f"--input {named}: no text under --json-keys {' '.join(keys)} to train on ({why})"


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        skipped = train(args)
    except (ValueError, RuntimeError) as e:  # sentencepiece reports bad settings as RuntimeError; status 2 as
        # the other tools give for bad input
        print(f"train_tokenizer.py: error: {e}", file=sys.stderr)
        return 2
    print(f"[train_tokenizer] wrote {args.model_prefix}.model ({args.vocab_size:,} pieces, {args.model_type}) "
          f"in {time.perf_counter() - start:.1f} s; skipped {skipped.total} line(s)", file=sys.stderr)
    for line in skipped.lines():
        print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
