#!/usr/bin/env python
"""JSON-lines shards -> Megatron `.bin`/`.idx` token datasets, one per JSON key.

    python tools/preprocess_data.py --input data/sample --output-prefix out/c4 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes `out/c4_text_document.bin/.idx` (Megatron-LM's flags and names) and, beside them,
`out/c4_text_document.tokenizer.json`: which tokenizer made them, checked by training, merging and
the tools (megatron_snm/data/tokenizer_description.py). With `--output-per-input`
each input file gets its own `PREFIX_<file stem>_<key>_document` instead.

How it runs: the main process streams the input in chunks of lines (~1 MiB), worker processes
parse and tokenize the chunks, and the main process appends the results strictly in input
order, so the output does not depend on `--workers`. At most a few chunks per worker are in
flight, so memory stays flat however large the input. Bad lines are skipped and counted by
reason (see megatron_snm/data/json_lines.py); `--strict` stops at the first one instead.
Outputs are written under temporary names and renamed when complete, so an interrupted run
leaves nothing that looks like a dataset; the next run into that prefix removes what it left.
An existing dataset is replaced only with `--overwrite`, and only once the new one is whole.

Megatron-LM's own flags (`--partitions`, `--keep-sequential-samples`, `--split-sentences`, ...)
keep their meaning or are refused with a message; docs/megatron_flags_preprocess.md lists them.

Exit status: 0 done; 2 bad configuration, a bad line under --strict, nothing kept, or an output
that cannot be written (one line naming the flag or file); 1 a worker process died or failed;
130 interrupted; 143 terminated. A run that fails publishes nothing and leaves no file behind.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time

import numpy as np

from megatron_snm.data.indexed_dataset import (
    IndexedDatasetBuilder, best_token_dtype, bin_path, clear_stale_temporaries, idx_path,
)
from megatron_snm.data.json_lines import (
    SUFFIXES, Chunk, SkipLog, expand_inputs, parse_line, read_chunks, total_input_bytes,
)
from megatron_snm.data.tokenizer_description import describe, description_path
from megatron_snm.data.tokenizers import TOKENIZER_TYPES, build_tokenizer
from megatron_snm.data.worker_pool import OrderedPool, WorkerDied, WorkerFailed

# Megatron-LM's default, kept so that a given --max-documents can be told from the default.
MEGATRON_MAX_DOCUMENTS = 100_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help=f"files, globs or directories of {', '.join(SUFFIXES)} JSON lines")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to tokenize, each into its own dataset (default: text)")
    g.add_argument("--strict", action="store_true",
                   help="stop with exit status 2 at the first bad line instead of skipping it")
    g.add_argument("--split-sentences", action="store_true",
                   help="Megatron's sentence-level output: refused (it needs NLTK's punkt model)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="Megatron: keep newlines when splitting sentences (no effect without --split-sentences)")
    g.add_argument("--lang", default="english",
                   help="Megatron: the punkt language of --split-sentences (no effect without it)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or a tokenizer.json / its directory")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer: ids before the end of document (text is ids "
                   "written as decimal numbers)")
    g.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's eod id")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    g.add_argument("--output-per-input", action="store_true",
                   help="one dataset per input file, PREFIX_<file stem>_<key>_document, instead of one for all")
    g.add_argument("--overwrite", action="store_true",
                   help="replace datasets already under the output names (the old ones stay until the new are complete)")
    g.add_argument("--dataset-impl", default="mmap",
                   help="Megatron-DeepSpeed's format flag: only mmap (the MMIDIDX .bin/.idx) is written")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="input bytes per unit of work sent to a worker (default 1 MiB)")
    g.add_argument("--log-interval", type=int, default=1000, help="log progress every N documents")
    g.add_argument("--partitions", type=int, default=1,
                   help="Megatron's partitions: input line i goes to partition i mod N, and the output holds "
                        "partition 0's documents, then 1's, ... (the input order with --keep-sequential-samples)")
    g.add_argument("--keep-sequential-samples", action="store_true",
                   help="Megatron: with --partitions, keep the documents in input order")
    g.add_argument("--max-documents", type=int, default=MEGATRON_MAX_DOCUMENTS,
                   help="Megatron: documents per trial of --find-optimal-num-workers (no effect here)")
    g.add_argument("--find-optimal-num-workers", action="store_true",
                   help="Megatron's worker-count search: refused (measure with benchmarks/preprocess.py)")
    g.add_argument("--workers-to-check", nargs="+", type=int,
                   help="Megatron: with --find-optimal-num-workers (refused)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.chunk_bytes < 1:
        p.error("--chunk-bytes must be positive")
    if args.log_interval < 1:
        p.error("--log-interval must be at least 1")
    if args.partitions < 1:
        p.error("--partitions must be at least 1")
    if args.partitions > 1 and args.output_per_input:
        p.error("--partitions orders the documents of one output; it cannot be combined with --output-per-input")
    duplicate = next((k for i, k in enumerate(args.json_keys) if k in args.json_keys[:i]), None)
    if duplicate is not None:
        p.error(f"--json-keys names {duplicate!r} twice; each key writes its own dataset, so give it once")
    if args.split_sentences:
        p.error("--split-sentences is not supported: Megatron splits with NLTK's punkt model, which is not "
                "installed here and which this tool does not download; preprocess at document level (without "
                "this flag), or split the text into sentences before preprocessing")
    if args.find_optimal_num_workers or args.workers_to_check:
        p.error("--find-optimal-num-workers / --workers-to-check are not supported: compare worker counts with "
                "benchmarks/preprocess.py, then pass --workers")
    if args.dataset_impl != "mmap":
        p.error(f"--dataset-impl {args.dataset_impl}: only mmap (Megatron's MMIDIDX .bin/.idx) is written")
    return args


def no_effect_notes(args) -> list[str]:
    """One line for each Megatron flag given that changes nothing here, saying why."""
    notes = []
    if args.keep_newlines:
        notes.append("--keep-newlines has no effect without --split-sentences (documents keep their newlines)")
    if args.lang != "english":
        notes.append(f"--lang {args.lang} has no effect without --split-sentences")
    if args.max_documents != MEGATRON_MAX_DOCUMENTS:
        notes.append("--max-documents has no effect: Megatron uses it only with --find-optimal-num-workers")
    if args.keep_sequential_samples and args.partitions == 1:
        notes.append("--keep-sequential-samples has no effect with one partition (the order is the input's)")
    return notes


# ---------------------------------------------------------------------------------------------
# Workers: parse and tokenize one chunk.

@dataclasses.dataclass
class Tokenized:
    """A chunk's documents, ready to append: per key, all token ids back to back plus lengths."""

    file_index: int
    tokens: list[np.ndarray]  # one per JSON key
    lengths: np.ndarray  # int64 [documents, keys]
    line_numbers: np.ndarray  # int64 [documents]: each document's line in its file, from 1
    first_line: int
    lines: int  # lines in the chunk, blank and bad ones included (Megatron's partitions count them)
    skips: list[tuple[str, str]]
    nbytes: int
    position: int
    opened: bool
    end_of_file: bool


_worker = None  # (tokenizer, keys, append_eod, dtype), set in each worker by _init_worker


def _init_worker(tokenizer, keys, append_eod, dtype):
    global _worker
    _worker = (tokenizer, tuple(keys), append_eod, np.dtype(dtype))


def tokenize_chunk(chunk: Chunk) -> Tokenized:
    tokenizer, keys, append_eod, dtype = _worker
    skips, docs, doc_lines = [], [], []  # skips as (line number, reason)
    lines = 0
    for lineno, raw in chunk.lines():
        lines += 1
        parsed = parse_line(raw, keys)
        if isinstance(parsed, str):
            skips.append((lineno, parsed))
        elif parsed is not None:
            docs.append(parsed)
            doc_lines.append(lineno)

    ids = [tokenizer.tokenize_batch_numpy([d[k] for d in docs]) for k in range(len(keys))]
    keep = []
    for i, lineno in enumerate(doc_lines):
        if all(len(ids_k[i]) for ids_k in ids):
            keep.append(i)
        else:  # text that tokenizes to nothing (e.g. only characters the model drops)
            skips.append((lineno, "empty_text"))
    skips = [(reason, f"{chunk.path}:{lineno}") for lineno, reason in sorted(skips)] + chunk.skips

    eod = np.array([tokenizer.eod] if append_eod else [], dtype=dtype)
    tokens, lengths = [], np.zeros((len(keep), len(keys)), dtype=np.int64)
    for k, ids_k in enumerate(ids):
        lengths[:, k] = [len(ids_k[i]) + len(eod) for i in keep]
        pieces = [piece for i in keep for piece in (ids_k[i], eod)]
        tokens.append(np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.empty(0, dtype))
    line_numbers = np.array([doc_lines[i] for i in keep], dtype=np.int64)
    return Tokenized(chunk.file_index, tokens, lengths, line_numbers, chunk.first_line, lines, skips,
                     len(chunk.data), chunk.position, chunk.opened, chunk.end_of_file)


# ---------------------------------------------------------------------------------------------
# The writer: appends results in order, one output (or one per input file) per key.

class BadInput(Exception):
    """A skipped line under --strict."""


class NothingKept(Exception):
    """No document survived (every line rejected, or no lines): there is no dataset to write."""


def output_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def log(message: str) -> None:
    print(f"[preprocess] {message}", file=sys.stderr, flush=True)


def output_prefixes(args, files) -> list[list[str]]:
    """Per output (one, or one per input file): the prefix of each key's dataset. Checked before
    any work: distinct names, a writable directory, no dataset there already unless --overwrite,
    no other run writing there. Temporaries a killed run left are removed, with a log line."""
    groups = [f"{args.output_prefix}_{output_stem(f)}" for f in files] if args.output_per_input else [args.output_prefix]
    if len(set(groups)) != len(groups):
        dup = next(g for g in groups if groups.count(g) > 1)
        raise ValueError(f"--output-per-input: two inputs share the file stem of {dup!r}; give them distinct names")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-prefix {args.output_prefix}: cannot create {out_dir} ({e.strerror})") from e
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--output-prefix {args.output_prefix}: {out_dir} is not writable")
    prefixes = [[f"{g}_{key}_document" for key in args.json_keys] for g in groups]
    for prefix in (p for group in prefixes for p in group):
        clear_stale_temporaries(prefix, log)
        existing = [path for path in (bin_path(prefix), idx_path(prefix), description_path(prefix))
                    if os.path.lexists(path)]
        if existing and not args.overwrite:
            raise ValueError(
                f"{existing[0]} already exists; pass --overwrite to replace it (the old dataset stays until "
                "the new one is complete), or choose another --output-prefix"
            )
    return prefixes


@dataclasses.dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    lines: int = 0  # input lines read, blank and bad ones included
    input_bytes: int = 0  # uncompressed bytes of every line read
    output_bytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = dataclasses.field(default_factory=list)
    empty_outputs: list[str] = dataclasses.field(default_factory=list)  # kept no document: not written
    skipped: SkipLog = dataclasses.field(default_factory=SkipLog)


class Writer:
    """Appends tokenized chunks, already in input order, to one builder per JSON key; with
    --output-per-input, finalizes each file's datasets at its last chunk and opens the next
    file's at its first (a file that could not be opened, or kept no document, gets none).

    With `partitions` > 1 (Megatron's --partitions without --keep-sequential-samples), input
    line i, counted over all files, goes to partition i mod N, and the output holds partition
    0's documents, then partition 1's, ...: the order Megatron's partitioned run writes.
    """

    def __init__(self, prefixes: list[list[str]], dtype, per_input: bool, partitions: int = 1, overwrite: bool = False,
                 tokenizer: dict | None = None):
        self.prefixes, self.dtype, self.per_input, self.partitions = prefixes, dtype, per_input, partitions
        self.tokenizer = tokenizer  # its description, written beside every dataset
        self.overwrite = overwrite
        self.builders: list[list[IndexedDatasetBuilder]] = []  # [key][partition]
        self.lines_before_file = 0
        self.group_documents = 0
        self.summary = Summary()

    def _open(self, group: int) -> None:
        self.group_documents = 0
        for prefix in self.prefixes[group]:  # one at a time, so that abort() finds each one made
            self.builders.append([])
            for _ in range(self.partitions):
                self.builders[-1].append(IndexedDatasetBuilder(prefix, self.dtype, self.tokenizer))

    def _finalize(self, group: int) -> None:
        if self.group_documents == 0:  # an empty dataset would only fail later, in training
            self.abort()
            self.summary.empty_outputs.extend(self.prefixes[group])
            return
        for parts in self.builders:
            for part in parts[1:]:
                parts[0].add_builder(part)
                part.abort()
            parts[0].finalize(replace=self.overwrite)
        self.builders = []
        for prefix in self.prefixes[group]:
            self.summary.outputs.append(prefix)
            self.summary.output_bytes += os.path.getsize(bin_path(prefix)) + os.path.getsize(idx_path(prefix))

    def write(self, result: Tokenized) -> None:
        group = result.file_index if self.per_input else 0
        if not self.builders and result.opened:
            self._open(group)
        partition = (self.lines_before_file + result.line_numbers - 1) % self.partitions
        for k, parts in enumerate(self.builders):
            bounds = np.concatenate([[0], np.cumsum(result.lengths[:, k])])
            for start, end, part in zip(bounds[:-1], bounds[1:], partition):
                parts[part].add_document(result.tokens[k][start:end])
        self.summary.documents += len(result.lengths)
        self.group_documents += len(result.lengths)
        self.summary.tokens += int(result.lengths.sum())
        self.summary.input_bytes += result.nbytes
        self.summary.lines += result.lines
        if result.end_of_file:
            self.lines_before_file += result.first_line - 1 + result.lines
            if self.per_input and self.builders:
                self._finalize(group)

    def close(self) -> None:
        if self.summary.documents == 0:
            self.abort()
            raise NothingKept(nothing_kept_message(self.summary))
        if self.builders:
            self._finalize(0)

    def abort(self) -> None:
        for parts in self.builders:
            for builder in parts:
                builder.abort()
        self.builders = []


def nothing_kept_message(summary: Summary) -> str:
    if summary.lines == 0:
        return "the input holds no lines; no dataset written"
    reasons = "; ".join(summary.skipped.lines()) or "every line is blank"
    hint = " (is --json-keys right? lines without the key are skipped)" if summary.skipped.counts["missing_key"] else ""
    return f"kept no document of {summary.lines:,} input line(s): {reasons}{hint}; no dataset written"


# ---------------------------------------------------------------------------------------------

class Progress:
    """A log line every `interval` documents: documents, rate, MB/s and the ETA from input bytes."""

    def __init__(self, interval: int, total_bytes: int):
        self.interval, self.total_bytes = interval, total_bytes
        self.start = time.perf_counter()
        self.next_log = interval

    def update(self, summary: Summary, position: int) -> None:
        if summary.documents < self.next_log:
            return
        self.next_log = (summary.documents // self.interval + 1) * self.interval
        elapsed = time.perf_counter() - self.start
        fraction = position / self.total_bytes if self.total_bytes else 1.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        print(
            f"[preprocess] {summary.documents:,} docs, {summary.tokens:,} tokens | "
            f"{summary.documents / elapsed:,.0f} docs/s, {summary.input_bytes / elapsed / 1e6:.2f} MB/s | "
            f"{100 * fraction:.1f}% of input, ETA {eta:.0f} s",
            file=sys.stderr, flush=True,
        )


def run(args) -> Summary:
    """Preprocesses `args` (from `parse_args`). Raises ValueError (DataError among them) or
    FileNotFoundError on a bad configuration before any work, BadInput on a bad line under
    --strict, NothingKept when no document survives, DataError when an output cannot be
    written, WorkerDied / WorkerFailed when a worker dies or fails. Whatever it raises, it
    leaves no file behind."""
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model,
                                args.vocab_size)
    prefixes = output_prefixes(args, files)
    dtype = best_token_dtype(tokenizer.vocab_size)
    for note in no_effect_notes(args):
        log(note)
    # With --keep-sequential-samples Megatron's partitions are contiguous blocks of lines, which
    # it merges back in order: the input order, which one partition gives.
    partitions = 1 if args.keep_sequential_samples else args.partitions
    log(
        f"{len(files)} input file(s), {total_input_bytes(files) / 1e6:.1f} MB on disk; "
        f"{args.tokenizer_type} (vocab {tokenizer.vocab_size:,}, eod {tokenizer.eod}, {dtype}); "
        f"{args.workers} worker(s)" + (f"; documents interleaved over {partitions} partitions" if partitions > 1 else "")
    )

    start = time.perf_counter()
    writer = Writer(prefixes, dtype, args.output_per_input, partitions, args.overwrite,
                    describe(tokenizer, args.tokenizer_model or args.vocab_file))
    progress = Progress(args.log_interval, total_input_bytes(files))
    try:
        with OrderedPool(tokenize_chunk, args.workers, _init_worker,
                         (tokenizer, args.json_keys, args.append_eod, dtype)) as pool:
            for result in pool.map(read_chunks(files, args.chunk_bytes)):
                for reason, where in result.skips:
                    if args.strict:
                        raise BadInput(f"{where}: {reason.replace('_', ' ')} (--strict)")
                    writer.summary.skipped.add(reason, where)
                writer.write(result)
                progress.update(writer.summary, result.position)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    writer.summary.seconds = time.perf_counter() - start
    return writer.summary


def print_summary(s: Summary) -> None:
    lines = [
        f"documents  {s.documents:,}",
        f"tokens     {s.tokens:,}",
        f"input      {s.input_bytes / 1e6:,.2f} MB of JSON lines",
        f"output     {s.output_bytes / 1e6:,.2f} MB in {len(s.outputs)} dataset(s): {', '.join(s.outputs[:4])}"
        f"{' ...' if len(s.outputs) > 4 else ''}",
        f"time       {s.seconds:.2f} s ({s.documents / max(s.seconds, 1e-9):,.0f} docs/s, "
        f"{s.input_bytes / max(s.seconds, 1e-9) / 1e6:.2f} MB/s)",
        f"skipped    {s.skipped.total:,} line(s)" + (":" if s.skipped.total else ""),
        *(f"  {line}" for line in s.skipped.lines()),
        *([f"not written (kept no document): {', '.join(s.empty_outputs[:4])}{' ...' if len(s.empty_outputs) > 4 else ''}"]
          if s.empty_outputs else []),
    ]
    print("[preprocess] done\n" + "\n".join("  " + line for line in lines), file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A plain `kill` unwinds like Ctrl-C, so the temporary outputs are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, BadInput, NothingKept) as e:  # DataError is a ValueError
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"preprocess_data.py: error: tokenizing {e}; no output written", file=sys.stderr)
        return 1
    except WorkerFailed as e:
        print(f"preprocess_data.py: error: a tokenizing worker failed, no output written: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output written", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
