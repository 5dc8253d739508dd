#!/usr/bin/env python
"""JSON-lines shards -> Megatron `.bin`/`.idx` token datasets, one per JSON key.

    python tools/preprocess_data.py --input data/sample --output-prefix out/c4 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \\
        --append-eod --workers 2

writes `out/c4_text_document.bin/.idx` (Megatron-LM's flags and names). With `--output-per-input`
each input file gets its own `PREFIX_<file stem>_<key>_document` instead.

How it runs: the main process streams the input in chunks of lines (~1 MiB), worker processes
parse and tokenize the chunks, and the main process appends the results strictly in input
order, so the output does not depend on `--workers`. At most a few chunks per worker are in
flight, so memory stays flat however large the input. Bad lines are skipped and counted by
reason (see megatron_snm/data/json_lines.py); `--strict` stops at the first one instead.
Outputs are written under temporary names and renamed when complete, so an interrupted run
leaves nothing that looks like a dataset.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder, best_token_dtype  # noqa: E402
from megatron_snm.data.json_lines import (  # noqa: E402
    SUFFIXES, Chunk, SkipLog, expand_inputs, parse_line, read_chunks, total_input_bytes,
)
from megatron_snm.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help=f"files, globs or directories of {', '.join(SUFFIXES)} JSON lines")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys to tokenize, each into its own dataset (default: text)")
    g.add_argument("--strict", action="store_true",
                   help="stop with exit status 1 at the first bad line instead of skipping it")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", help="GPT-2 vocab.json")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or a tokenizer.json / its directory")
    g.add_argument("--append-eod", action="store_true", help="end every document with the tokenizer's eod id")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx")
    g.add_argument("--output-per-input", action="store_true",
                   help="one dataset per input file, PREFIX_<file stem>_<key>_document, instead of one for all")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    g.add_argument("--chunk-bytes", type=int, default=1 << 20,
                   help="input bytes per unit of work sent to a worker (default 1 MiB)")
    g.add_argument("--log-interval", type=int, default=1000, help="log progress every N documents")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.chunk_bytes < 1:
        p.error("--chunk-bytes must be positive")
    if args.log_interval < 1:
        p.error("--log-interval must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------
# Workers: parse and tokenize one chunk.

@dataclasses.dataclass
class Tokenized:
    """A chunk's documents, ready to append: per key, all token ids back to back plus lengths."""

    file_index: int
    tokens: list[np.ndarray]  # one per JSON key
    lengths: np.ndarray  # int64 [documents, keys]
    skips: list[tuple[str, str]]
    nbytes: int
    position: int
    opened: bool
    end_of_file: bool


_worker = None  # (tokenizer, keys, append_eod, dtype), set in each worker by _init_worker


def _init_worker(tokenizer, keys, append_eod, dtype):
    global _worker
    _worker = (tokenizer, tuple(keys), append_eod, np.dtype(dtype))
    # Ctrl-C reaches the whole process group; the main process alone decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # If the main process is killed outright, take the workers with it rather than orphan them.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tokenize_chunk(chunk: Chunk) -> Tokenized:
    tokenizer, keys, append_eod, dtype = _worker
    skips, docs, doc_lines = [], [], []  # skips as (line number, reason)
    for lineno, raw in chunk.lines():
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
    return Tokenized(chunk.file_index, tokens, lengths, skips, len(chunk.data), chunk.position,
                     chunk.opened, chunk.end_of_file)


def ordered_map(pool: ProcessPoolExecutor, fn, items, in_flight: int):
    """`fn` over `items` on the pool, results in input order, at most `in_flight` submitted ahead
    (Executor.map would read the whole input up front)."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------
# The writer: appends results in order, one output (or one per input file) per key.

class BadInput(Exception):
    """A skipped line under --strict."""


def output_stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_prefixes(args, files) -> list[list[str]]:
    """Per output (one, or one per input file): the prefix of each key's dataset."""
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
    return [[f"{g}_{key}_document" for key in args.json_keys] for g in groups]


@dataclasses.dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0  # uncompressed bytes of every line read
    output_bytes: int = 0
    seconds: float = 0.0
    outputs: list[str] = dataclasses.field(default_factory=list)
    skipped: SkipLog = dataclasses.field(default_factory=SkipLog)


class Writer:
    def __init__(self, prefixes: list[list[str]], dtype, per_input: bool):
        self.prefixes, self.dtype, self.per_input = prefixes, dtype, per_input
        self.builders: list[IndexedDatasetBuilder] = []
        self.summary = Summary()

    def _open(self, group: int) -> None:
        self.builders = [IndexedDatasetBuilder(prefix, self.dtype) for prefix in self.prefixes[group]]

    def _finalize(self, group: int) -> None:
        for builder in self.builders:
            builder.finalize()
        self.builders = []
        for prefix in self.prefixes[group]:
            self.summary.outputs.append(prefix)
            self.summary.output_bytes += os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx")

    def write(self, result: Tokenized) -> None:
        group = result.file_index if self.per_input else 0
        if not self.builders and result.opened:
            self._open(group)
        for k, builder in enumerate(self.builders):
            bounds = np.concatenate([[0], np.cumsum(result.lengths[:, k])])
            for start, end in zip(bounds[:-1], bounds[1:]):
                builder.add_document(result.tokens[k][start:end])
        self.summary.documents += len(result.lengths)
        self.summary.tokens += int(result.lengths.sum())
        self.summary.input_bytes += result.nbytes
        if result.end_of_file and self.per_input and self.builders:
            self._finalize(group)

    def close(self) -> None:
        if self.builders:
            self._finalize(0)

    def abort(self) -> None:
        for builder in self.builders:
            builder.abort()
        self.builders = []


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
    """Preprocesses `args` (from `parse_args`); raises ValueError/FileNotFoundError on a bad
    configuration before any work, BadInput on a bad line under --strict."""
    files = expand_inputs(args.input)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model)
    prefixes = output_prefixes(args, files)
    dtype = best_token_dtype(tokenizer.vocab_size)
    print(
        f"[preprocess] {len(files)} input file(s), {total_input_bytes(files) / 1e6:.1f} MB on disk; "
        f"{args.tokenizer_type} (vocab {tokenizer.vocab_size:,}, eod {tokenizer.eod}, {dtype}); "
        f"{args.workers} worker(s)", file=sys.stderr, flush=True,
    )

    start = time.perf_counter()
    writer = Writer(prefixes, dtype, args.output_per_input)
    progress = Progress(args.log_interval, total_input_bytes(files))
    pool = ProcessPoolExecutor(
        args.workers, mp_context=multiprocessing.get_context("fork"),
        initializer=_init_worker, initargs=(tokenizer, args.json_keys, args.append_eod, dtype),
    )
    try:
        for result in ordered_map(pool, tokenize_chunk, read_chunks(files, args.chunk_bytes), in_flight=2 * args.workers + 2):
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
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
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
    ]
    print("[preprocess] done\n" + "\n".join("  " + line for line in lines), file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    # A plain `kill` unwinds like Ctrl-C, so the temporary outputs are removed on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, BadInput) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("preprocess_data.py: error: a worker process died (killed, or out of memory?); "
              "no output written", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output written", file=sys.stderr)
        return 130
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
