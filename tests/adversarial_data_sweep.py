#!/usr/bin/env python
"""The data side's adversarial sweep (issue 13): bad inputs and faults against preprocessing,
merging, dataset opening and batching, each classified by how it ended.

    python tests/adversarial_data_sweep.py [--work-dir DIR]

Outcomes: `clear error` (exit status 1/2 or a DataError, one line naming the file or flag,
nothing lost), `correct` (the run succeeds and its output is checked), and the failures we aim
to have none of: `traceback`, `silent wrong`, `loss`, `hang`. Prints one line per case, then the
counts as a JSON line. Not collected by pytest (the classes have their own tests); ~2 minutes.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from megatron_snm.data.errors import DataError
from megatron_snm.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron_snm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_snm.training.data import micro_batches
from tests.sweep_runner import run_sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
GPT2 = pathlib.Path(os.environ.get("MEGATRON_SNM_GPT2_DIR", REPO.parent / "shared" / "data" / "gpt2"))
SAMPLE = REPO / "data" / "sample" / "c4-train.00000-of-00001.json.gz"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOK = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2 / "vocab.json"),
       "--merge-file", str(GPT2 / "merges.txt")]
CASES = []
with gzip.open(SAMPLE, "rt", encoding="utf-8") as _f:
    SAMPLE_DOCUMENTS = sum(1 for line in _f if line.strip())


def case(name):
    def register(fn):
        CASES.append((name, fn))
        return fn
    return register


def tool(name, *argv, timeout=120, preexec_fn=None):
    """(exit status or 'hang', stderr) of a tools/ script."""
    try:
        run = subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, argv)], env=ENV,
                             capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired:
        return "hang", ""
    return run.returncode, run.stderr


def judged(status, stderr, expect, files_ok=True, tool_name="preprocess_data.py"):
    """How a run that should fail with `expect` in its message ended."""
    if status == "hang":
        return "hang", "no exit within the timeout"
    if "Traceback" in stderr:
        return "traceback", stderr.strip().splitlines()[-1]
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if status == 0:
        return "silent wrong", "exit status 0"
    if not files_ok:
        return "loss", last
    if status in (1, 2) and expect in last and (last.startswith(f"{tool_name}: error") or "usage:" in stderr):
        return "clear error", last
    return "silent wrong", f"status {status}: {last}"


def snapshot(prefix):
    return {ext: pathlib.Path(f"{prefix}{ext}").read_bytes() for ext in (".bin", ".idx")}


def small_dataset(work, name="old", texts=("an old dataset",)):
    (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    status, err = tool("preprocess_data.py", "--input", work / f"{name}.jsonl", "--output-prefix", work / name, *TOK)
    assert status == 0, err
    return work / f"{name}_text_document"


def no_files_but(work, *names):
    return sorted(p.name for p in work.iterdir()) == sorted(names)


def api(fn, expect):
    """How a library call that should raise DataError with `expect` ended."""
    try:
        fn()
    except DataError as e:
        ok = expect in str(e) and "\n" not in str(e)
        return ("clear error" if ok else "silent wrong"), str(e)[:160]
    except Exception as e:
        return "traceback", f"{type(e).__name__}: {e}"[:160]
    return "silent wrong", "no error"


# --- preprocessing: outputs and leftovers --------------------------------------------------------

@case("existing output without --overwrite")
def _(work):
    old = small_dataset(work)
    before = snapshot(old)
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "old", *TOK)
    return judged(status, err, "already exists", snapshot(old) == before)


@case("--json-keys text text over an existing dataset, --overwrite")
def _(work):
    old = small_dataset(work)
    before = snapshot(old)
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "old", *TOK,
                       "--json-keys", "text", "text", "--overwrite")
    return judged(status, err, "twice", snapshot(old) == before)


@case("--overwrite replaces a dataset only when the new one is whole")
def _(work):
    old = small_dataset(work)
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "old", *TOK, "--overwrite")
    ok = status == 0 and IndexedDataset(str(old)).num_documents == SAMPLE_DOCUMENTS and no_files_but(
        work, "old.jsonl", "old_text_document.bin", "old_text_document.idx")
    return ("correct" if ok else "silent wrong"), f"status {status}"


@case("a .bin without .idx at the output prefix")
def _(work):
    (work / "x_text_document.bin").write_bytes(b"12")
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "x", *TOK)
    return judged(status, err, "already exists", (work / "x_text_document.bin").read_bytes() == b"12")


@case("temporaries of a SIGKILLed run, next run into the prefix")
def _(work):
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *[SAMPLE] * 6,
                             "--output-prefix", work / "k", *TOK, "--workers", "2", "--chunk-bytes", "40000"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(work.glob("k_text_document.bin.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    left = list(work.glob("k_text_document.*.tmp-*"))
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "k", *TOK)
    ok = status == 0 and left and "left by an interrupted run" in err and no_files_but(
        work, "k_text_document.bin", "k_text_document.idx")
    return ("correct" if ok else "silent wrong"), f"{len(left)} temporaries, status {status}"


@case("a temporary of a live process at the prefix")
def _(work):
    busy = work / f"b_text_document.idx.tmp-{socket.gethostname()}-{os.getpid()}-00ff00ff"
    busy.write_bytes(b"busy")
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "b", *TOK)
    return judged(status, err, "still running", busy.read_bytes() == b"busy")


@case("two runs into one new prefix at once")
def _(work):
    procs = [subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", SAMPLE,
                               "--output-prefix", work / "race", *TOK], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    statuses = sorted(r[0] for r in results)
    valid = IndexedDataset(str(work / "race_text_document")).num_documents == SAMPLE_DOCUMENTS
    clean = no_files_but(work, "race_text_document.bin", "race_text_document.idx")
    # One wins; the other either refuses up front or at publish time, never replaces silently.
    if statuses == [0, 2] and valid and clean:
        return "clear error", [r[1] for r in results if r[0] == 2][0].strip().splitlines()[-1][:160]
    return ("silent wrong" if statuses == [0, 0] else "loss"), f"statuses {statuses}"


# --- preprocessing: nothing kept, bad input ------------------------------------------------------

@case("--json-keys names a key no line has")
def _(work):
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "o", *TOK, "--json-keys", "body")
    return judged(status, err, "kept no document", no_files_but(work))


@case("an empty input file")
def _(work):
    (work / "e.jsonl").write_text("")
    status, err = tool("preprocess_data.py", "--input", work / "e.jsonl", "--output-prefix", work / "o", *TOK)
    return judged(status, err, "no lines", no_files_but(work, "e.jsonl"))


@case("a binary file named .jsonl")
def _(work):
    (work / "b.jsonl").write_bytes(os.urandom(50_000))
    status, err = tool("preprocess_data.py", "--input", work / "b.jsonl", "--output-prefix", work / "o", *TOK)
    return judged(status, err, "kept no document", no_files_but(work, "b.jsonl"))


@case("the output .bin given as input")
def _(work):
    old = small_dataset(work)
    before = snapshot(old)
    status, err = tool("preprocess_data.py", "--input", f"{old}.bin", "--output-prefix", work / "old", *TOK, "--overwrite")
    return judged(status, err, "kept no document", snapshot(old) == before)


@case("--strict and a malformed line")
def _(work):
    (work / "a.jsonl").write_text('{"text": "good"}\n{broken\n')
    status, err = tool("preprocess_data.py", "--input", work / "a.jsonl", "--output-prefix", work / "o", *TOK, "--strict")
    return judged(status, err, "a.jsonl:2: malformed json", no_files_but(work, "a.jsonl"))


@case("mixed bad lines (non-UTF-8, numbers as text, deep nesting, truncated gzip)")
def _(work):
    (work / "a.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "caf\xe9"}\n{"text": 7}\n' + b"[" * 50_000 + b"\n")
    (work / "b.json.gz").write_bytes(gzip.compress(b'{"text": "gz good"}\n' * 200)[:-30])
    status, err = tool("preprocess_data.py", "--input", work / "a.jsonl", work / "b.json.gz", "--output-prefix",
                       work / "o", *TOK)
    ok = status == 0 and "non_utf8: 1" in err and "missing_key: 1" in err and "truncated_gzip: 1" in err
    return ("correct" if ok else judged(status, err, "")[0]), f"status {status}"


@case("one 5 MB document on one line")
def _(work):
    text = ("word " * 1_000_000)[:5_000_000]
    (work / "big.jsonl").write_text(json.dumps({"text": text}) + "\n")
    status, err = tool("preprocess_data.py", "--input", work / "big.jsonl", "--output-prefix", work / "o", *TOK,
                       "--workers", "2", "--chunk-bytes", "1000")
    from megatron_snm.data.tokenizers import build_tokenizer

    expected = len(build_tokenizer("GPT2BPETokenizer", GPT2 / "vocab.json", GPT2 / "merges.txt").tokenize(text))
    ok = status == 0 and IndexedDataset(str(work / "o_text_document")).document_lengths.tolist() == [expected]
    return ("correct" if ok else "silent wrong"), f"status {status}"


@case("--chunk-bytes 1 gives the default's bytes")
def _(work):
    a = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "a", *TOK, "--chunk-bytes", "1",
             "--workers", "2")
    b = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "b", *TOK)
    ok = a[0] == b[0] == 0 and snapshot(work / "a_text_document") == snapshot(work / "b_text_document")
    return ("correct" if ok else "silent wrong"), f"statuses {a[0]}, {b[0]}"


@case("--input that matches nothing")
def _(work):
    return judged(*tool("preprocess_data.py", "--input", work / "nope-*.jsonl", "--output-prefix", work / "o", *TOK),
                  "no file matches", no_files_but(work))


@case("--output-prefix under a regular file")
def _(work):
    (work / "f").write_text("")
    return judged(*tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "f" / "o", *TOK),
                  "cannot create", no_files_but(work, "f"))


@case("--output-per-input with two inputs of one stem")
def _(work):
    for d in ("x", "y"):
        (work / d).mkdir()
        shutil.copy(SAMPLE, work / d / SAMPLE.name)
    status, err = tool("preprocess_data.py", "--input", work / "x" / SAMPLE.name, work / "y" / SAMPLE.name,
                       "--output-prefix", work / "o", *TOK, "--output-per-input")
    return judged(status, err, "share the file stem", no_files_but(work, "x", "y"))


@case("--workers 0")
def _(work):
    return judged(*tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "o", *TOK, "--workers", "0"),
                  "--workers must be at least 1", no_files_but(work))


# --- preprocessing: tokenizer files --------------------------------------------------------------

def tokenizer_case(kind):
    def run(work):
        garbage = work / "garbage"
        garbage.write_bytes(os.urandom(4096))
        flags = {
            "SentencePiece model": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", garbage],
            "tokenizer.json": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", garbage],
            "vocab.json": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", garbage, "--merge-file", GPT2 / "merges.txt"],
            "merges.txt": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2 / "vocab.json", "--merge-file", garbage],
            "directory as SentencePiece model": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", work],
            "missing SentencePiece model": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", work / "none"],
        }[kind]
        status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "o", *flags)
        named = str(work / "none") if kind.startswith("missing") else str(work) if kind.startswith("directory") \
            else str(garbage)
        return judged(status, err, named, no_files_but(work, "garbage"))
    return run


for _kind in ("SentencePiece model", "tokenizer.json", "vocab.json", "merges.txt", "directory as SentencePiece model",
              "missing SentencePiece model"):
    case(f"garbage tokenizer: {_kind}")(tokenizer_case(_kind))


# --- preprocessing: faults -----------------------------------------------------------------------

@case("full disk (RLIMIT_FSIZE) with --overwrite of an old dataset")
def _(work):
    old = small_dataset(work)
    before = snapshot(old)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "old", *TOK, "--overwrite",
                       preexec_fn=limit)
    return judged(status, err, "File too large", snapshot(old) == before and no_files_but(
        work, "old.jsonl", "old_text_document.bin", "old_text_document.idx"))


@case("no space left on device (a 64 KiB tmpfs)")
def _(work):
    mount = work / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        return "skipped", "cannot mount a tmpfs (not root)"
    try:
        status, err = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", mount / "o", *TOK)
        return judged(status, err, "No space left on device", os.listdir(mount) == [])
    finally:
        subprocess.run(["umount", str(mount)])


def kill_case(target, sig):
    def run(work):
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *[SAMPLE] * 6,
                                 "--output-prefix", work / "o", *TOK, "--workers", "2", "--chunk-bytes", "30000"],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(work.glob("o_text_document.bin.tmp-*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(0.1)
        workers = psutil.Process(proc.pid).children()
        victim = psutil.Process(proc.pid) if target == "main" else workers[0]
        victim.send_signal(sig)
        if target == "stopped worker":  # a worker that hangs: the run is still stoppable
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            for w in workers:
                w.kill()
            return "hang", f"{target} {sig.name}: no exit within 15 s"
        orphans = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        expect = "died" if target == "worker" else ""
        verdict = judged(proc.returncode, err, expect, not orphans and os.listdir(work) == []) if target == "worker" \
            else (("correct" if proc.returncode == 143 and not orphans and os.listdir(work) == [] else "silent wrong"),
                  f"status {proc.returncode}")
        return verdict
    return run


case("a worker SIGKILLed mid-run")(kill_case("worker", signal.SIGKILL))
case("a worker SIGTERMed mid-run")(kill_case("worker", signal.SIGTERM))
case("the tool SIGTERMed mid-run")(kill_case("main", signal.SIGTERM))
case("a worker SIGSTOPped, then the tool SIGTERMed")(kill_case("stopped worker", signal.SIGSTOP))


# --- Megatron's flags ----------------------------------------------------------------------------

@case("--split-sentences (needs NLTK punkt)")
def _(work):
    return judged(*tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "o", *TOK, "--split-sentences"),
                  "punkt", no_files_but(work))


@case("--partitions 0")
def _(work):
    return judged(*tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "o", *TOK, "--partitions", "0"),
                  "--partitions must be at least 1", no_files_but(work))


@case("--partitions 4 --keep-sequential-samples equals one partition")
def _(work):
    a = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "a", *TOK, "--partitions", "4",
             "--keep-sequential-samples")
    b = tool("preprocess_data.py", "--input", SAMPLE, "--output-prefix", work / "b", *TOK)
    ok = a[0] == b[0] == 0 and snapshot(work / "a_text_document") == snapshot(work / "b_text_document")
    return ("correct" if ok else "silent wrong"), f"statuses {a[0]}, {b[0]}"


# --- merging -------------------------------------------------------------------------------------

@case("merge into an existing output without --overwrite")
def _(work):
    old = small_dataset(work)
    other = small_dataset(work, "other", ("other text",))
    before = snapshot(old)
    return judged(*tool("merge_datasets.py", "--input", other, "--output-prefix", old), "already exists",
                  snapshot(old) == before, "merge_datasets.py")


@case("merge with a corrupt input .idx")
def _(work):
    good = small_dataset(work)
    bad = small_dataset(work, "bad", ("bad one", "two"))
    raw = bytearray(pathlib.Path(f"{bad}.idx").read_bytes())
    raw[-8:] = struct.pack("<q", 1)  # the last document index
    pathlib.Path(f"{bad}.idx").write_bytes(bytes(raw))
    return judged(*tool("merge_datasets.py", "--input", good, bad, "--output-prefix", work / "m"), f"{bad}.idx",
                  not list(work.glob("m.*")), "merge_datasets.py")


# --- opening datasets ----------------------------------------------------------------------------

def two_documents(work):
    with IndexedDatasetBuilder(str(work / "d"), np.uint16) as b:
        b.add_document(np.arange(5))
        b.add_document(np.arange(7))
        b.finalize()
    return work / "d"


def corrupt_case(edit, expect):
    def run(work):
        prefix = two_documents(work)
        idx, data = edit(bytearray((work / "d.idx").read_bytes()), bytearray((work / "d.bin").read_bytes()))
        (work / "d.idx").write_bytes(bytes(idx))
        (work / "d.bin").write_bytes(bytes(data))
        return api(lambda: IndexedDataset(str(prefix)), expect)
    return run


for _name, _edit, _expect in [
    ("a pointer off by 2 bytes", lambda i, b: (i[:50] + struct.pack("<q", 12) + i[58:], b), "sequence 1 starts at byte 12"),
    ("a negative length", lambda i, b: (i[:34] + struct.pack("<i", -4) + i[38:], b), "length -4"),
    ("document indices that fall back", lambda i, b: (i[:66] + struct.pack("<qq", 2, 1), b), "before document 1"),
    ("a document index past the sequences", lambda i, b: (i[:66] + struct.pack("<q", 9) + i[74:], b), "of 2"),
    ("bytes after the index", lambda i, b: (i + b"junk", b), "after the end of the index"),
    ("a truncated index", lambda i, b: (i[:-3], b), "truncated index"),
    ("another file's magic", lambda i, b: (b"PK\x03\x04" + i[4:], b), "not an MMIDIDX index"),
    ("a .bin of an odd byte count", lambda i, b: (i, b + b"\0"), "not a whole number of uint16 tokens"),
    ("a truncated .bin", lambda i, b: (i, b[:-4]), "truncated or mismatched"),
    ("a .bin of another run (longer)", lambda i, b: (i, b + b"\0\0"), "different runs"),
]:
    case(f"dataset: {_name}")(corrupt_case(_edit, _expect))


@case("dataset: the .bin missing")
def _(work):
    prefix = two_documents(work)
    (work / "d.bin").unlink()
    return api(lambda: IndexedDataset(str(prefix)), "d.bin: no such file")


@case("dataset: no documents")
def _(work):
    with IndexedDatasetBuilder(str(work / "d"), np.uint16) as b:
        b.finalize()
    return api(lambda: build_train_valid_test_datasets(str(work / "d"), "1,0,0", (4, 0, 0), 8, 1), "0 documents")


@case("dataset: one token")
def _(work):
    with IndexedDatasetBuilder(str(work / "d"), np.uint16) as b:
        b.add_document([3])
        b.finalize()
    return api(lambda: build_train_valid_test_datasets(str(work / "d"), "1,0,0", (4, 0, 0), 8, 1), "hold 1 tokens")


for _split in ("1,,1", "nan,1,1", "-1,2,0", "a,b", "1,2,3,4", "0,0,0"):
    case(f"--split {_split!r}")(lambda work, s=_split: api(
        lambda: build_train_valid_test_datasets(str(two_documents(work)), s, (4, 1, 0), 4, 1), "--split"))


@case("--split that starves validation while --eval-iters > 0")
def _(work):
    return api(lambda: build_train_valid_test_datasets(str(two_documents(work)), "969,30,1", (4, 2, 0), 4, 1),
               "gives the valid set no documents")


@case("--data-path with a negative weight")
def _(work):
    p = str(two_documents(work))
    return api(lambda: build_train_valid_test_datasets(["-1", p, "2", p], "1,0,0", (4, 0, 0), 4, 1), "must be positive")


@case("index cache: a prefix re-preprocessed with other content (same .idx size)")
def _(work):
    def write(lengths):
        with IndexedDatasetBuilder(str(work / "d"), np.int32) as b:
            for n in lengths:
                b.add_document(np.arange(n))
            b.finalize()
        return IndexedDataset(str(work / "d"))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 80)
    GPTDataset(write(lengths), (0, 80), 100, 16, 1)
    new = write(rng.permutation(lengths) + 3)
    try:
        ds = GPTDataset(new, (0, 80), 100, 16, 1)
        ref = GPTDataset(new, (0, 80), 100, 16, 1, cache_dir=str(work / "fresh"))
        same = all(np.array_equal(ds[i]["text"], ref[i]["text"]) for i in range(len(ds)))
    except Exception as e:
        return "traceback", f"{type(e).__name__}: {e}"
    return ("correct" if same else "silent wrong"), "samples equal a fresh build" if same else "stale samples"


@case("index cache: a truncated .npy")
def _(work):
    ds = GPTDataset(IndexedDataset(str(two_documents(work))), (0, 2), 10, 4, 1)
    path = ds.paths["document_index"]
    open(path, "r+b").truncate(60)
    return api(lambda: GPTDataset(IndexedDataset(str(work / "d")), (0, 2), 10, 4, 1), "damaged index cache")


@case("index cache directory under a regular file")
def _(work):
    (work / "file").write_text("")
    return api(lambda: GPTDataset(IndexedDataset(str(two_documents(work))), (0, 2), 10, 4, 1,
                                  cache_dir=str(work / "file" / "cache")), "cannot write the dataset index cache")


@case("token ids past the vocabulary: refused at open")
def _(work):
    return api(lambda: build_train_valid_test_datasets(str(two_documents(work)), "1,0,0", (4, 0, 0), 4, 1, vocab_size=6),
               "holds token id 6")


@case("token ids past the vocabulary: refused in the micro-batch")
def _(work):
    ds = GPTDataset(IndexedDataset(str(two_documents(work))), (0, 2), 8, 4, 1)
    return api(lambda: list(micro_batches(ds, 0, 8, 2, 0, 1, torch.device("cpu"), vocab_size=5)),
               "outside the model's vocabulary of 5 ids")


# --- training: what pretrain_gpt.py makes of bad data (its exit-status mapping is issue 13's) -----

def pretrain(work, data_prefix, tokenizer_flags):
    argv = [sys.executable, str(REPO / "pretrain_gpt.py"), "--num-layers", "1", "--hidden-size", "16",
            "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0", "--split", "1,0,0", "--data-path",
            str(data_prefix), "--data-cache-path", str(work / "cache"), *map(str, tokenizer_flags)]
    env = {**ENV, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29700 + os.getpid() % 200)}
    try:
        run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=work)
    except subprocess.TimeoutExpired:
        return "hang", ""
    return run.returncode, run.stderr


def sentencepiece_model(work):
    subprocess.run([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", SAMPLE, "--model-prefix",
                    work / "sp", "--vocab-size", "500"], env=ENV, capture_output=True, check=True)
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", work / "sp.model"]


@case("pretrain_gpt.py: a garbage SentencePiece model")
def _(work):
    (work / "garbage.model").write_bytes(os.urandom(2048))
    prefix = small_dataset(work)
    status, err = pretrain(work, prefix, ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                                          work / "garbage.model"])
    return judged(status, err, "garbage.model: not a valid SentencePiece model", True, "pretrain_gpt.py")


@case("pretrain_gpt.py: data of a larger vocabulary than the tokenizer's")
def _(work):
    prefix = small_dataset(work, texts=["GPT-2 ids run far past 500"] * 20)  # GPT-2 ids, up to 50256
    status, err = pretrain(work, prefix, sentencepiece_model(work))
    return judged(status, err, "but the tokenizer has only 500 ids", True, "pretrain_gpt.py")


@case("pretrain_gpt.py: a corrupt .idx")
def _(work):
    prefix = small_dataset(work, texts=[f"document {i}" for i in range(20)])
    raw = bytearray(pathlib.Path(f"{prefix}.idx").read_bytes())
    raw[34:38] = struct.pack("<i", -1)
    pathlib.Path(f"{prefix}.idx").write_bytes(bytes(raw))
    status, err = pretrain(work, prefix, TOK)
    return judged(status, err, "corrupt index", True, "pretrain_gpt.py")


def main() -> int:
    return run_sweep(CASES, __doc__.split("\n")[0], "data_sweep_")


if __name__ == "__main__":
    sys.exit(main())
