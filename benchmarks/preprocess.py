#!/usr/bin/env python
"""Throughput and memory of tools/preprocess_data.py against the tokenizer's own speed.

    python benchmarks/preprocess.py                    # builds the corpus with make_corpus.sh
    python benchmarks/preprocess.py --input DIR_OR_FILES

Baseline (the ceiling): the same texts, already in memory, through the tokenizer's batch call
(lists or arrays, whichever is faster) in this one process. Then preprocess_data.py, as a
subprocess, with --workers 1 and 2, and with 2 workers on the input given twice. Its throughput
is its own processing time (the summary's `time`, which leaves out interpreter start-up and
tokenizer loading, as the baseline does); memory is the peak of the summed RSS of the tool and
its workers, sampled every 50 ms (an upper bound: forked workers share pages with the main
process). Rounds are interleaved and the best of each configuration kept.

Wall-clock ratios need idle cores: where the kernel shares CPU fairly between sessions
(sched_autogroup) and other sessions are busy, extra worker processes get no extra CPU. So the
CPU seconds per input MB are reported too, and from them the ratio two free cores would allow.

Last line, JSON: ratio = 2-worker throughput / single-process tokenizer throughput (target >= 1.7
on 2 free cores), with peak RSS (target < 1 GB, flat when the input doubles).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from megatron_snm.data.json_lines import expand_inputs, parse_line, read_chunks
from megatron_snm.data.tokenizers import build_tokenizer

# ../shared/data beside the checkout (as in tests/conftest.py); MEGATRON_SNM_GPT2_DIR overrides.
GPT2_DIR = os.environ.get("MEGATRON_SNM_GPT2_DIR", os.path.join(os.path.dirname(REPO), "shared", "data", "gpt2"))
SHARED_DATA = os.path.dirname(os.path.abspath(GPT2_DIR))  # holds make_corpus.sh


def corpus_files(args) -> list[str]:
    if args.input:
        return expand_inputs(args.input)
    out = os.path.join(args.work_dir, "corpus")
    if not os.path.isfile(os.path.join(out, "manifest.txt")):
        print(f"[bench] building the corpus with make_corpus.sh into {out}", file=sys.stderr, flush=True)
        subprocess.run(["bash", os.path.join(SHARED_DATA, "make_corpus.sh"), out], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return expand_inputs([out])


def tokenizer_files(args) -> dict:
    if args.tokenizer_type == "GPT2BPETokenizer":
        return {"vocab_file": os.path.join(GPT2_DIR, "vocab.json"), "merge_file": os.path.join(GPT2_DIR, "merges.txt")}
    return {"tokenizer_model": args.tokenizer_model}


def load_batches(files, args):
    """The texts, in memory, in the batches preprocess_data.py sends its workers."""
    batches, nbytes = [], 0
    for chunk in read_chunks(files, args.chunk_bytes):
        batches.append([p[0] for p in (parse_line(raw, ("text",)) for _, raw in chunk.lines()) if isinstance(p, tuple)])
        nbytes += len(chunk.data)
    return batches, nbytes


def ceiling(tokenize_batch, batches, nbytes) -> dict:
    """The tokenizer alone, in this one process."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens = sum(len(ids) for batch in batches for ids in tokenize_batch(batch))
    return {"docs": sum(map(len, batches)), "tokens": tokens, "input_mb": nbytes / 1e6,
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def preprocess(files, workers, args, out_prefix) -> dict:
    """One preprocess_data.py run: its summary, peak RSS of its process tree, and CPU seconds
    of the tool and its workers (from getrusage of waited-for descendants)."""
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", *files,
           "--output-prefix", out_prefix, "--tokenizer-type", args.tokenizer_type,
           *(x for flag, path in tokenizer_files(args).items() for x in (f"--{flag.replace('_', '-')}", path)),
           "--append-eod", "--workers", str(workers), "--chunk-bytes", str(args.chunk_bytes), "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": REPO}, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:  # a process ended between listing and reading
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stderr = proc.communicate()[1]
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_data.py failed ({proc.returncode}):\n{stderr}")
    summary = {name: re.search(rf"^\s+{name}\s+([\d,.]+)", stderr, re.M).group(1).replace(",", "")
               for name in ("documents", "tokens", "input", "time")}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"docs": int(summary["documents"]), "tokens": int(summary["tokens"]), "input_mb": float(summary["input"]),
            "seconds": float(summary["time"]), "cpu_seconds": cpu, "peak_rss_mb": peak[0] / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", help="JSON-lines files/globs/dirs (default: the make_corpus.sh corpus)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "megatron_snm_bench_preprocess"),
                   help="where the corpus is built (kept for reuse) and outputs are written")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                   choices=("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"))
    p.add_argument("--tokenizer-model", help="for SentencePiece / Hugging Face tokenizers")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--repeat", type=int, default=2, help="rounds of (ceiling, workers=1, workers=2); best of each kept")
    args = p.parse_args()

    files = corpus_files(args)
    tokenizer = build_tokenizer(args.tokenizer_type, **tokenizer_files(args))
    batches, nbytes = load_batches(files, args)
    out = os.path.join(args.work_dir, "out")
    one_line = os.path.join(args.work_dir, "one-line.jsonl")  # an empty input is refused: nothing kept
    with open(one_line, "w") as f:
        f.write('{"text": "x"}\n')
    # Start-up CPU (interpreter, imports, tokenizer load, worker start) is not per-byte work.
    startup_cpu = preprocess([one_line], 2, args, out)["cpu_seconds"]
    print(f"[bench] start-up CPU of preprocess_data.py (one-line input): {startup_cpu:.2f} s", file=sys.stderr, flush=True)

    rounds = {"base": [], "w1": [], "w2": []}
    for r in range(args.repeat):
        # Interleaved, so that load from other users of the machine hits every configuration alike.
        # Both of the tokenizer's outputs, lists and arrays: the ceiling is the faster.
        rounds["base"] += [ceiling(f, batches, nbytes) for f in (tokenizer.tokenize_batch, tokenizer.tokenize_batch_numpy)]
        rounds["w1"].append(preprocess(files, 1, args, out))
        rounds["w2"].append(preprocess(files, 2, args, out))
        print(f"[bench] round {r + 1}/{args.repeat}: " + ", ".join(
            f"{k} {v[-1]['input_mb'] / v[-1]['seconds']:.2f} MB/s" for k, v in rounds.items()), file=sys.stderr, flush=True)
    base, w1, w2 = (min(v, key=lambda run: run["seconds"]) for v in rounds.values())
    w2x2 = preprocess(files * 2, 2, args, out)
    for name in ("_text_document.bin", "_text_document.idx"):
        os.remove(out + name)
    for run in (w1, w2, w2x2):
        copies = run["docs"] // base["docs"]  # with --append-eod: one more token per document
        assert run["tokens"] == copies * (base["tokens"] + base["docs"]), "preprocess and ceiling disagree"

    speed = lambda r: r["input_mb"] / r["seconds"]  # noqa: E731
    # CPU per input MB, start-up removed: the pipeline's overhead over the bare tokenizer.
    cpu_per_mb = lambda r: max(r["cpu_seconds"] - (startup_cpu if "peak_rss_mb" in r else 0), 1e-9) / r["input_mb"]  # noqa: E731
    print(f"\n{args.tokenizer_type} on {base['docs']:,} documents, {base['input_mb']:.1f} MB, {base['tokens']:,} tokens; "
          f"best of {args.repeat}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"{'':36s} {'docs/s':>8s} {'MB/s':>6s} {'x ceiling':>9s} {'CPU s/MB':>8s} {'peak RSS MB':>11s}")
    for name, r in (("tokenizer alone (1 process, ceiling)", base), ("preprocess_data --workers 1", w1),
                    ("preprocess_data --workers 2", w2), ("preprocess_data --workers 2, input x2", w2x2)):
        rss = f"{r['peak_rss_mb']:11.0f}" if "peak_rss_mb" in r else ""
        print(f"{name:36s} {r['docs'] / r['seconds']:8.1f} {speed(r):6.2f} {speed(r) / speed(base):9.2f} "
              f"{cpu_per_mb(r):8.3f} {rss}")

    print(json.dumps({
        "benchmark": "preprocess",
        "ratio": round(speed(w2) / speed(base), 3),
        "tokenizer": args.tokenizer_type,
        "docs": base["docs"], "input_mb": round(base["input_mb"], 1), "tokens": base["tokens"],
        "ceiling_mb_s": round(speed(base), 2),
        "workers1_mb_s": round(speed(w1), 2), "workers2_mb_s": round(speed(w2), 2),
        "workers1_ratio": round(speed(w1) / speed(base), 3),
        # What 2 fully free cores would allow: 2 x (tokenizer CPU per MB / pipeline CPU per MB).
        "cpu_bound_ratio_2_cores": round(2 * cpu_per_mb(base) / cpu_per_mb(w2), 3),
        "peak_rss_mb_workers1": round(w1["peak_rss_mb"]), "peak_rss_mb_workers2": round(w2["peak_rss_mb"]),
        "peak_rss_mb_workers2_input_x2": round(w2x2["peak_rss_mb"]),
        "rss_growth_input_x2": round(w2x2["peak_rss_mb"] / w2["peak_rss_mb"], 3),
        "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2), "repeat": args.repeat,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
