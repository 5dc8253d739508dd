#!/usr/bin/env python
"""Evaluates a checkpoint: perplexity on a dataset or JSON lines, LAMBADA-style last-word accuracy.

    python tools/evaluate.py --load CKPT_DIR --data-path PREFIX      # a preprocess_data.py .bin/.idx
    python tools/evaluate.py --load CKPT_DIR --jsonl FILE            # one {"text": ...} per line
    python tools/evaluate.py --load CKPT_DIR --lambada FILE          # passages; the last word is the target
    torchrun --nproc_per_node 4 tools/evaluate.py --load CKPT_DIR --jsonl FILE --tensor-model-parallel-size 2

Runs alone or under the training launchers (deepspeed, torchrun, mpirun) with any TP x PP x DP
layout, whatever layout the checkpoint was saved in. Windows are --seq-length tokens (default:
the model's) moved by --stride (default: the window, no overlap; less for sliding-window
perplexity); JSON-lines documents are each scored after an end-of-document token, as
lm-eval-harness does, so the word and byte perplexities match its `loglikelihood_rolling` tasks.
With --data-path only the documents the run did not train on are scored by default: the held-out
(validation and test) part of the --split the checkpoint recorded, as pretrain_gpt.py splits them;
--split and --split-part choose others (all: every document).
The last line printed is one JSON object with at least `perplexity` and `tokens`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from megatron_snm.data.json_lines import parse_line
from megatron_snm.inference import evaluate as ev
from megatron_snm.inference.cli import (DTYPES, UsageError, add_checkpoint_flags, check_data_tokenizer,
                                        load_checkpoint_and_tokenizer, read_text_lines, run_tool)
from megatron_snm.inference.model import InferenceGPT, start_runtime, stop_runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_flags(p)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", help="indexed dataset prefix (PREFIX.bin / PREFIX.idx), read as one token stream")
    data.add_argument("--jsonl", help="JSON lines, one document per line under --json-key")
    data.add_argument("--lambada", help="JSON lines of passages; the final word of each is predicted")
    p.add_argument("--json-key", default="text", help="key of the text in --jsonl / --lambada lines (default: text)")
    p.add_argument("--seq-length", type=int, help="window length (default and maximum: the model's --seq-length)")
    p.add_argument("--stride", type=int, help="tokens the window moves by (default: the window length)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--split", help="--data-path: train,valid,test proportions of its documents, as pretrain_gpt.py's "
                   "--split (default: the one the checkpoint's run recorded)")
    p.add_argument("--split-part", choices=PARTS, default="held-out",
                   help="--data-path: which documents of --split to evaluate: held-out (default: valid and test, "
                        "never trained on), valid, test, train, or all")
    p.add_argument("--max-tokens", type=int, help="--data-path: evaluate only the first this many tokens")
    p.add_argument("--max-documents", type=int, help="--jsonl / --lambada: only the first this many lines")
    return p.parse_args(argv)


def read_texts(path: str, key: str, limit: int | None, flag: str) -> list[str]:
    texts = []
    for lineno, line in read_text_lines(path, flag):
        if not line.strip():
            continue
        parsed = parse_line(line.encode("utf-8"), (key,))
        if isinstance(parsed, str) or not parsed:
            raise UsageError(f"{path}:{lineno}: {parsed or 'no text'} (expected a JSON object with {key!r})")
        texts.append(parsed[0])
        if limit and len(texts) == limit:
            break
    if not texts:
        raise UsageError(f"{path}: no documents")
    return texts


PARTS = ("held-out", "valid", "test", "train", "all")


def documents_to_evaluate(split: str, part: str, num_documents: int) -> tuple[int, int]:
    """Document range [begin, end) of `part` under `split` (pretrain_gpt.py's rule, so held-out
    means exactly the documents the run did not train on)."""
    from megatron_snm.data.gpt_dataset import split_document_ranges

    if part == "all":
        return 0, num_documents
    try:
        train, valid, test = split_document_ranges(split, num_documents)
    except ValueError as err:
        raise UsageError(str(err)) from None
    begin, end = {"held-out": (valid[0], test[1]), "valid": valid, "test": test, "train": train}[part]
    if begin >= end:
        raise UsageError(f"--split {split} leaves the {part} part of the {num_documents} documents empty: give "
                         "another --split or --split-part (all: every document)")
    return begin, end


def lambada_pairs(texts: list[str], tokenizer, path: str) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids): as lm-eval, the target's ids are those of the whole passage after
    the context's."""
    pairs = []
    for i, text in enumerate(texts, 1):
        context, space, word = text.rstrip().rpartition(" ")
        if not space:
            raise UsageError(f"{path}: passage {i} has a single word; nothing to predict it from")
        context_ids, whole = tokenizer.tokenize(context), tokenizer.tokenize(context + " " + word)
        pairs.append((context_ids, whole[len(context_ids):]))
    return pairs


def main(argv=None) -> int:
    return run_tool("evaluate.py", lambda: _main(parse_args(argv)))


def _main(args) -> int:
    start = time.perf_counter()
    ckpt, tok = load_checkpoint_and_tokenizer(args, need_tokenizer=args.data_path is None)
    tokenizer = tok[1] if tok else None
    model_length = ckpt.gpt_config().seq_length
    window = args.seq_length or model_length
    if not 1 <= window <= model_length:
        raise UsageError(f"--seq-length {window}: the model {ckpt.directory} has --seq-length {model_length} "
                         "(the context it was trained on), so windows must be 1 .. that long")
    stride = args.stride or window

    if args.data_path:
        from megatron_snm.data.indexed_dataset import IndexedDataset

        try:
            dataset = IndexedDataset(args.data_path)
        except (OSError, ValueError) as err:
            raise UsageError(f"--data-path {args.data_path}: {err}") from None
        check_data_tokenizer(args.data_path, ckpt, tok)
        split = args.split or ckpt.run_config.data.split
        begin, end = documents_to_evaluate(split, args.split_part, len(dataset))
        print(f"evaluate.py: {args.data_path}: documents {begin}..{end - 1} of {len(dataset)}, the {args.split_part} "
              f"part of --split {split}" + ("" if args.split else " (the checkpoint's)"), file=sys.stderr)
        stream = []  # the documents in order, as one token stream (each ends with its EOD)
        for i in range(begin, end):
            stream.extend(dataset[i].tolist())
            if args.max_tokens and len(stream) >= args.max_tokens:
                break
        stream = stream[:args.max_tokens] if args.max_tokens else stream
        vocab = tokenizer.vocab_size if tokenizer else ckpt.vocab_rows
        if stream and max(stream) >= vocab:
            raise UsageError(f"{args.data_path}: token id {max(stream)} is outside the model's vocabulary of {vocab}")
        sequences = [stream]
        text = tokenizer.detokenize(stream[1:]) if tokenizer else None  # what the scored tokens spell
    elif args.jsonl:
        texts = read_texts(args.jsonl, args.json_key, args.max_documents, "--jsonl")
        sequences = [[tokenizer.eod] + tokenizer.tokenize(t) for t in texts]
    else:
        texts = read_texts(args.lambada, args.json_key, args.max_documents, "--lambada")
        pairs = lambada_pairs(texts, tokenizer, args.lambada)

    runtime = start_runtime(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    vocab = tokenizer.vocab_size if tokenizer else ckpt.vocab_rows
    model = InferenceGPT(ckpt, vocab, runtime, DTYPES[args.dtype] if args.dtype else None)
    from megatron_snm.parallel import state

    shard = (state.get_data_parallel_rank(), state.get_data_parallel_world_size())
    if args.lambada:
        totals = ev.last_word(model, pairs, window, shard, args.micro_batch_size).reduce(model)
    else:
        totals = ev.perplexity(model, sequences, window, stride, shard, args.micro_batch_size).reduce(model)
        scored = texts if args.jsonl else ([text] if text is not None else [])
        totals.words = sum(len(re.split(r"\s+", t)) for t in scored)
        totals.bytes = sum(len(t.encode("utf-8")) for t in scored)
    result = dict(ev.figures(totals), checkpoint=ckpt.directory, iteration=ckpt.iteration,
                  data=args.data_path or args.jsonl or args.lambada, seq_length=window, stride=stride,
                  **(dict(split=split, split_part=args.split_part, documents=[begin, end]) if args.data_path else {}),
                  seconds=round(time.perf_counter() - start, 2))
    stop_runtime(runtime)
    if runtime.rank == 0:
        summary = ", ".join(f"{k} {result[k]:.4f}" for k in ("perplexity", "word_perplexity", "byte_perplexity", "accuracy")
                            if k in result)
        print(f"evaluate.py: {result['tokens']} tokens, {summary}", file=sys.stderr)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
