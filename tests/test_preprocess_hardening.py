"""tools/preprocess_data.py against a hostile user: an existing dataset is never destroyed, a
killed run's leftovers are cleaned by the next, a dead worker ends the run at once, a run that
keeps nothing or cannot write fails with one clear line (exit status 2) and leaves no file, and
Megatron-LM's preprocessing flags keep their meaning or are refused."""
import gzip
import json
import os
import random
import re
import resource
import signal
import socket
import threading
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from megatron_snm.data.indexed_dataset import IndexedDataset
from megatron_snm.data.tokenizers import build_tokenizer

sys.path.insert(0, str(REPO / "tools"))
import preprocess_data  # noqa: E402

TRAIN = "c4-train.00000-of-00001.json.gz"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOOL = str(REPO / "tools" / "preprocess_data.py")


def gpt2_args(gpt2_files):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_files[0]), "--merge-file", str(gpt2_files[1])]


def cli(*argv, **kwargs):
    return subprocess.run([sys.executable, TOOL, *map(str, argv)], env=ENV, capture_output=True, text=True,
                          timeout=120, **kwargs)


def preprocess(*argv):
    return preprocess_data.run(preprocess_data.parse_args([str(a) for a in argv]))


@pytest.fixture
def main(capsys):
    """preprocess_data.main in this process (no interpreter start-up): (exit status, stderr)."""
    def run(*argv):
        handler = signal.getsignal(signal.SIGTERM)  # main() installs its own
        capsys.readouterr()  # what ran before is not this run's output
        try:
            status = preprocess_data.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's refusals
            status = e.code
        finally:
            signal.signal(signal.SIGTERM, handler)
        return status, capsys.readouterr().err
    return run


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


def files_of(directory):
    return sorted(p.name for p in directory.iterdir())


def snapshot(prefix):
    return {ext: open(f"{prefix}{ext}", "rb").read() for ext in (".bin", ".idx")}


def documents(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds.get_document(d).tolist() for d in range(ds.num_documents)]


# ---------------------------------------------------------------------------------------------
# Nothing lost

def test_an_existing_dataset_is_refused_without_overwrite_and_replaced_whole_with_it(gpt2_files, tmp_path, main):
    write_jsonl(tmp_path / "old.jsonl", ["the old dataset", "two documents"])
    write_jsonl(tmp_path / "new.jsonl", ["the new one"])
    preprocess("--input", tmp_path / "old.jsonl", "--output-prefix", tmp_path / "out" / "c4", *gpt2_args(gpt2_files))
    prefix = tmp_path / "out" / "c4_text_document"
    old = snapshot(prefix)

    status, err = main("--input", tmp_path / "new.jsonl", "--output-prefix", tmp_path / "out" / "c4", *gpt2_args(gpt2_files))
    assert status == 2
    assert err.strip() == (f"preprocess_data.py: error: {prefix}.bin already exists; pass --overwrite to replace "
                           "it (the old dataset stays until the new one is complete), or choose another --output-prefix")
    assert snapshot(prefix) == old

    status, err = main("--input", tmp_path / "new.jsonl", "--output-prefix", tmp_path / "out" / "c4",
                       *gpt2_args(gpt2_files), "--overwrite")
    assert status == 0, err
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    assert documents(prefix) == [tok.tokenize("the new one")]
    assert files_of(tmp_path / "out") == ["c4_text_document.bin", "c4_text_document.idx",
                                     "c4_text_document.tokenizer.json"]


def test_a_bin_without_its_idx_also_counts_as_existing(gpt2_files, tmp_path, main):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    (tmp_path / "out_text_document.bin").write_bytes(b"\0\0")
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    assert status == 2 and "out_text_document.bin already exists" in err


def test_duplicate_json_keys_are_refused_and_the_old_dataset_kept(gpt2_files, tmp_path, main):
    """`--json-keys text text` once deleted the old dataset and left a .bin without .idx."""
    write_jsonl(tmp_path / "a.jsonl", ["first", "second"])
    preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    old = snapshot(tmp_path / "out_text_document")
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files),
                       "--json-keys", "text", "text", "--overwrite")
    assert status == 2 and "--json-keys names 'text' twice" in err
    assert snapshot(tmp_path / "out_text_document") == old
    assert files_of(tmp_path) == ["a.jsonl", "out_text_document.bin", "out_text_document.idx",
                                     "out_text_document.tokenizer.json"]


def test_a_killed_runs_temporaries_are_removed_by_the_next_run_with_a_log_line(gpt2_files, sample_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, TOOL, "--input", *[sample_dir / TRAIN] * 8, "--output-prefix",
                             tmp_path / "out", *gpt2_args(gpt2_files), "--workers", "2", "--chunk-bytes", "50000"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out_text_document.bin.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.kill()  # SIGKILL: no chance to clean up
    finally:
        proc.kill()
        proc.wait()
    left = list(tmp_path.glob("out_text_document.*.tmp-*"))
    assert left and not (tmp_path / "out_text_document.idx").exists()

    write_jsonl(tmp_path / "a.jsonl", ["after the crash"])
    run = cli("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    assert run.returncode == 0, run.stderr
    for path in left:
        assert f"removed {path}, left by an interrupted run (process {proc.pid} on " in run.stderr
    assert files_of(tmp_path) == ["a.jsonl", "out_text_document.bin", "out_text_document.idx",
                                     "out_text_document.tokenizer.json"]


def test_a_temporary_of_a_running_process_is_refused_not_removed(gpt2_files, tmp_path, main):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    busy = tmp_path / f"out_text_document.bin.tmp-{socket.gethostname()}-{os.getpid()}-0123abcd"  # this test: alive
    busy.write_bytes(b"being written")
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    assert status == 2 and f"{busy}: being written by this process, which is still running" in err
    assert busy.read_bytes() == b"being written"
    assert files_of(tmp_path) == ["a.jsonl", busy.name]


# ---------------------------------------------------------------------------------------------
# A dead worker ends the run

def kill_a_worker_later(rng, delay_range, stop):
    """A thread that waits for this process's two workers, sleeps a random time in delay_range,
    SIGKILLs one of them and records when (unless `stop` is set first)."""
    record = {}

    me = psutil.Process()
    others = {p.pid for p in me.children()}  # e.g. multiprocessing's resource tracker, from earlier tests

    def kill():
        while len(workers := [p for p in me.children() if p.pid not in others]) < 2:
            if stop.is_set():
                return
            time.sleep(0.002)
        record["workers"] = workers
        time.sleep(rng.uniform(*delay_range))
        victim = rng.choice(workers)
        try:
            victim.kill()
        except psutil.NoSuchProcess:  # the run had already finished and reaped it
            pass
        record["killed"] = time.monotonic()

    thread = threading.Thread(target=kill)
    thread.start()
    return thread, record


def test_a_worker_killed_at_20_random_moments_always_ends_the_run_within_seconds(gpt2_files, sample_dir, tmp_path,
                                                                                 monkeypatch):
    """SIGKILL one worker at a random moment of a short run: the run ends within seconds, with a
    clear error and no file left, or (killed after its last chunk) completes correctly."""
    rng = random.Random(13)
    inputs = [sample_dir / TRAIN] * 2
    reference = tmp_path / "reference"
    preprocess("--input", *inputs, "--output-prefix", reference, *gpt2_args(gpt2_files), "--chunk-bytes", 20000)
    tokenizer = build_tokenizer("GPT2BPETokenizer", *gpt2_files)  # loaded once, not per trial
    monkeypatch.setattr(preprocess_data, "build_tokenizer", lambda *args: tokenizer)
    # Kill moments are drawn within the time an undisturbed run takes here (the machine's load
    # changes it), so that most kills land mid-run.
    started = time.monotonic()
    preprocess("--input", *inputs, "--output-prefix", tmp_path / "timed", *gpt2_args(gpt2_files), "--workers", 2,
               "--chunk-bytes", 20000)
    span = time.monotonic() - started
    outcomes = []
    for trial in range(20):
        out = tmp_path / f"trial{trial}"
        out.mkdir()
        stop = threading.Event()
        thread, record = kill_a_worker_later(rng, (0, 0.6 * span), stop)
        try:
            preprocess("--input", *inputs, "--output-prefix", out / "c4", *gpt2_args(gpt2_files), "--workers", 2,
                       "--chunk-bytes", 20000)
            outcome = "completed"
        except preprocess_data.WorkerDied as e:
            assert re.fullmatch(r"worker \d \(pid \d+\) died \(killed by SIGKILL; out of memory\?\)", str(e))
            outcome = "failed cleanly"
        finally:
            ended = time.monotonic()
            stop.set()
            thread.join()
        assert "killed" in record, f"trial {trial}: the workers were never seen"
        assert ended - record["killed"] < 5, f"trial {trial}: the run took {ended - record['killed']:.1f} s to end"
        assert not [w for w in record["workers"] if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        if outcome == "completed":  # the worker died after its last chunk: a complete, correct dataset
            assert snapshot(out / "c4_text_document") == snapshot(f"{reference}_text_document")
        else:
            assert os.listdir(out) == [], f"trial {trial} left {os.listdir(out)}"
        outcomes.append(outcome)
    print("outcomes of the 20 kills:", {o: outcomes.count(o) for o in set(outcomes)})  # shown with pytest -s
    assert outcomes.count("failed cleanly") >= 10, outcomes  # most kills landed mid-run


def test_the_command_line_reports_a_dead_worker_in_one_line(gpt2_files, sample_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, TOOL, "--input", *[sample_dir / TRAIN] * 8, "--output-prefix",
                             tmp_path / "c4", *gpt2_args(gpt2_files), "--workers", "2", "--chunk-bytes", "20000"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("c4_text_document.bin.tmp-*")):  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.005)
        psutil.Process(proc.pid).children()[0].kill()
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert re.fullmatch(r"preprocess_data\.py: error: tokenizing worker \d \(pid \d+\) died \(killed by SIGKILL; "
                        r"out of memory\?\); no output written", stderr.strip().splitlines()[-1])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Nothing kept, nothing writable, nothing readable: one line, exit status 2, no file

def test_a_run_that_keeps_nothing_fails_with_the_reasons(gpt2_files, tmp_path, main):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two", "three"])
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files),
                       "--json-keys", "body")
    assert status == 2
    last = err.strip().splitlines()[-1]
    assert last == (f"preprocess_data.py: error: kept no document of 3 input line(s): missing_key: 3 "
                    f"({tmp_path}/a.jsonl:1, {tmp_path}/a.jsonl:2, {tmp_path}/a.jsonl:3) (is --json-keys right? "
                    "lines without the key are skipped); no dataset written")
    (tmp_path / "empty.jsonl").write_text("")
    status, err = main("--input", tmp_path / "empty.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    assert status == 2 and "the input holds no lines; no dataset written" in err
    (tmp_path / "bad.jsonl").write_bytes(b"{not json\n\n[1]\n")
    status, err = main("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    assert status == 2 and "kept no document of 3 input line(s): malformed_json: 2" in err
    assert files_of(tmp_path) == ["a.jsonl", "bad.jsonl", "empty.jsonl"]


def test_per_input_outputs_skip_a_file_that_keeps_nothing(gpt2_files, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", ["kept"])
    write_jsonl(shards / "b.jsonl", ["no text key here"], key="url")
    summary = preprocess("--input", shards, "--output-prefix", tmp_path / "out" / "s", *gpt2_args(gpt2_files),
                         "--output-per-input")
    assert summary.outputs == [str(tmp_path / "out" / "s_a_text_document")]
    assert summary.empty_outputs == [str(tmp_path / "out" / "s_b_text_document")]
    assert files_of(tmp_path / "out") == ["s_a_text_document.bin", "s_a_text_document.idx",
                                     "s_a_text_document.tokenizer.json"]


def limit_file_size(nbytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_a_full_disk_ends_in_one_line_and_keeps_the_old_dataset(gpt2_files, sample_dir, tmp_path):
    """RLIMIT_FSIZE makes the .bin's writes fail (EFBIG) past 30 kB, as a full disk would."""
    write_jsonl(tmp_path / "small.jsonl", ["a small old dataset"])
    preprocess("--input", tmp_path / "small.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files))
    old = snapshot(tmp_path / "out_text_document")
    run = cli("--input", sample_dir, "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files), "--workers", 2,
              "--overwrite", preexec_fn=limit_file_size(30_000))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: {tmp_path}/out_text_document.bin: cannot write (File too large); "
        "nothing was written under that name")
    assert snapshot(tmp_path / "out_text_document") == old
    assert files_of(tmp_path) == ["out_text_document.bin", "out_text_document.idx",
                                     "out_text_document.tokenizer.json", "small.jsonl"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root; skipped elsewhere): a real ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_no_space_left_on_device_ends_in_one_line_and_no_file(gpt2_files, sample_dir, tiny_tmpfs, main):
    status, err = main("--input", sample_dir, "--output-prefix", tiny_tmpfs / "out", *gpt2_args(gpt2_files), "--workers", 2)
    assert status == 2
    assert err.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: {tiny_tmpfs}/out_text_document.bin: cannot write (No space left on device); "
        "nothing was written under that name")
    assert os.listdir(tiny_tmpfs) == []


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json", "vocab.json", "merges.txt"])
def test_a_garbage_tokenizer_file_is_one_line_naming_it(gpt2_files, tmp_path, kind, main):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    flags = {
        "sentencepiece": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", garbage],
        "tokenizer.json": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", garbage],
        "vocab.json": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", garbage, "--merge-file", gpt2_files[1]],
        "merges.txt": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0], "--merge-file", garbage],
    }[kind]
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *flags)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"preprocess_data.py: error: {garbage}: not a valid ")
    assert files_of(tmp_path) == ["a.jsonl", "garbage"]


# ---------------------------------------------------------------------------------------------
# Megatron-LM's preprocessing flags

def test_partitions_interleave_lines_as_megatron_does(gpt2_files, tmp_path):
    """Megatron's --partitions N sends input line i (over all files, bad and blank lines counted)
    to partition i mod N and writes partition 0's documents, then 1's, ..."""
    texts = [f"document number {i}" for i in range(11)]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[4] = "{broken"  # a bad line still takes its turn
    lines[7] = ""  # and so does a blank one
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:6]) + "\n")
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:  # the count goes on across files
        f.write("\n".join(lines[6:]) + "\n")
    inputs = ["--input", tmp_path / "a.jsonl", tmp_path / "b.json.gz", *gpt2_args(gpt2_files), "--append-eod"]
    preprocess(*inputs, "--output-prefix", tmp_path / "p3", "--partitions", 3, "--workers", 2, "--chunk-bytes", 30)
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    order = [i for p in range(3) for i in range(11) if i % 3 == p and i not in (4, 7)]
    assert documents(tmp_path / "p3_text_document") == [tok.tokenize(texts[i]) + [tok.eod] for i in order]

    # --keep-sequential-samples: contiguous partitions merged in order, i.e. the input order,
    # byte for byte what one partition writes.
    preprocess(*inputs, "--output-prefix", tmp_path / "seq", "--partitions", 3, "--keep-sequential-samples")
    preprocess(*inputs, "--output-prefix", tmp_path / "one")
    assert snapshot(tmp_path / "seq_text_document") == snapshot(tmp_path / "one_text_document")
    assert files_of(tmp_path) == ["a.jsonl", "b.json.gz", *(f"{p}_text_document.{e}" for p in ("one", "p3", "seq")
                                                             for e in ("bin", "idx", "tokenizer.json"))]


@pytest.mark.parametrize("flags, message", [
    (["--split-sentences"], "--split-sentences is not supported: Megatron splits with NLTK's punkt model"),
    (["--find-optimal-num-workers"], "compare worker counts with benchmarks/preprocess.py"),
    (["--workers-to-check", "4", "8"], "--find-optimal-num-workers / --workers-to-check are not supported"),
    (["--dataset-impl", "lazy"], "--dataset-impl lazy: only mmap"),
    (["--partitions", "2", "--output-per-input"], "cannot be combined with --output-per-input"),
    (["--partitions", "0"], "--partitions must be at least 1"),
])
def test_megatron_flags_we_do_not_support_are_refused_before_work(gpt2_files, tmp_path, flags, message, main):
    write_jsonl(tmp_path / "a.jsonl", ["text"])
    status, err = main("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files), *flags)
    assert status == 2 and message in err, err
    assert files_of(tmp_path) == ["a.jsonl"]


def test_megatron_flags_without_effect_say_so_and_change_nothing(gpt2_files, tmp_path, main):
    write_jsonl(tmp_path / "a.jsonl", ["line one\nline two", "another"])
    base = ["--input", tmp_path / "a.jsonl", *gpt2_args(gpt2_files)]
    assert main(*base, "--output-prefix", tmp_path / "plain")[0] == 0
    status, err = main(*base, "--output-prefix", tmp_path / "flags", "--keep-newlines", "--lang", "german",
                       "--max-documents", 5, "--keep-sequential-samples", "--dataset-impl", "mmap", "--log-interval", 1)
    assert status == 0, err
    for note in ("--keep-newlines has no effect without --split-sentences", "--lang german has no effect",
                 "--max-documents has no effect", "--keep-sequential-samples has no effect with one partition"):
        assert f"[preprocess] {note}" in err
    assert "[preprocess] 2 docs" in err  # --log-interval 1: a progress line per document
    assert snapshot(tmp_path / "flags_text_document") == snapshot(tmp_path / "plain_text_document")
