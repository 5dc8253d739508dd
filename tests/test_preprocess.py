"""tools/preprocess_data.py and tools/merge_datasets.py: what they write reads back as the
tokenizer's ids, independent of the worker count, with bad input counted and good input kept."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import REPO
from megatron_snm.data.indexed_dataset import IndexedDataset
from megatron_snm.data.tokenizers import build_tokenizer

sys.path.insert(0, str(REPO / "tools"))
import merge_datasets  # noqa: E402
import preprocess_data  # noqa: E402

TRAIN = "c4-train.00000-of-00001.json.gz"
VALID = "c4-validation.00000-of-00001.json.gz"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def gpt2_args(gpt2_files):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_files[0]), "--merge-file", str(gpt2_files[1])]


def preprocess(*argv):
    return preprocess_data.run(preprocess_data.parse_args([str(a) for a in argv]))


def cli(tool, *argv, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, argv)],
                          env=ENV, capture_output=True, text=True, timeout=120, **kwargs)


def read_texts(path, key="text"):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def documents(prefix):
    ds = IndexedDataset(str(prefix))
    docs = ds.document_indices
    return [np.concatenate([ds[s] for s in range(docs[d], docs[d + 1])]).tolist() for d in range(ds.num_documents)]


def same_bytes(a, b):
    return all(open(f"{a}{ext}", "rb").read() == open(f"{b}{ext}", "rb").read() for ext in (".bin", ".idx"))


def test_gpt2_sample_reads_back_as_tokenizer_ids(gpt2_files, sample_dir, tmp_path):
    summary = preprocess("--input", sample_dir / TRAIN, sample_dir / VALID, "--output-prefix", tmp_path / "c4",
                         *gpt2_args(gpt2_files), "--append-eod")
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    texts = read_texts(sample_dir / TRAIN) + read_texts(sample_dir / VALID)
    expected = [ids + [tok.eod] for ids in tok.tokenize_batch(texts)]
    assert documents(tmp_path / "c4_text_document") == expected
    assert IndexedDataset(str(tmp_path / "c4_text_document")).dtype == np.uint16
    assert (summary.documents, summary.tokens, summary.skipped.total) == (len(texts), sum(map(len, expected)), 0)
    assert summary.outputs == [str(tmp_path / "c4_text_document")]


def test_workers_do_not_change_the_output(gpt2_files, sample_dir, tmp_path):
    common = ["--input", sample_dir, *gpt2_args(gpt2_files), "--chunk-bytes", 60_000, "--append-eod"]
    preprocess(*common, "--workers", 1, "--output-prefix", tmp_path / "w1")
    preprocess(*common, "--workers", 2, "--output-prefix", tmp_path / "w2")
    assert same_bytes(tmp_path / "w1_text_document", tmp_path / "w2_text_document")
    assert IndexedDataset(str(tmp_path / "w2_text_document")).num_documents == 22


def test_sentencepiece_end_to_end_cli(sample_dir, tmp_path):
    """The README's path with no download: train a tokenizer on the sample, preprocess with it."""
    assert cli("train_tokenizer.py", "--input", sample_dir / TRAIN, "--model-prefix", tmp_path / "sp",
               "--vocab-size", 2000).returncode == 0
    run = cli("preprocess_data.py", "--input", sample_dir, "--output-prefix", tmp_path / "c4",
              "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "sp.model",
              "--workers", 2, "--chunk-bytes", 200_000, "--log-interval", 10)
    assert run.returncode == 0, run.stderr
    # Progress lines with rate and ETA, then the summary.
    assert "docs/s" in run.stderr and "MB/s" in run.stderr and "ETA" in run.stderr
    assert "documents  22" in run.stderr
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=tmp_path / "sp.model")
    texts = read_texts(sample_dir / TRAIN) + read_texts(sample_dir / VALID)
    assert documents(tmp_path / "c4_text_document") == tok.tokenize_batch(texts)  # no --append-eod


def write_lines(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"".join(lines))


def doc(text, **extra):
    return (json.dumps({"text": text, **extra}, ensure_ascii=False) + "\n").encode()


def test_bad_input_is_counted_and_good_documents_kept(gpt2_files, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "a.jsonl", [
        doc("first good"),
        b'{"text": "no closing brace"\n',                   # 2 malformed_json
        b'{"url": "u"}\n',                                   # 3 missing_key
        b'{"text": "caf\xe9"}\n',                            # 4 non_utf8 (Latin-1 byte)
        doc("   \n "),                                      # 5 empty_text
        b"\n",                                              # 6 blank line: not a document
        doc("second good, caf\u00e9 \u65e5\u672c"),
        b'["a", "list"]\n',                                 # 8 malformed_json (not an object)
        b'{"text": "lone \\ud800 surrogate"}\n',            # 9 non_utf8
        b'{"text": 42}\n',                                  # 10 missing_key
        doc("third good"),
        b"[" * 100_000 + b"\n",                            # 12 malformed_json (nested too deep)
    ])
    full = b"".join(doc(f"gz line {i} " + "w" * 2000) for i in range(40))
    (shards / "b.json.gz").write_bytes(gzip.compress(full)[:-200])  # truncated_gzip mid-stream
    write_lines(shards / "c.json.gz", [doc("gz good")])
    (shards / "d.json.gz").write_bytes(b"this is not gzip\n")      # corrupt_gzip
    (shards / "e.jsonl").symlink_to(tmp_path / "vanished.jsonl")  # unreadable_file

    summary = preprocess("--input", shards, "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files),
                         "--chunk-bytes", 100, "--workers", 2, "--append-eod")
    counts = dict(summary.skipped.counts)
    assert counts == {"malformed_json": 3, "missing_key": 2, "non_utf8": 2, "empty_text": 1,
                      "truncated_gzip": 1, "corrupt_gzip": 1, "unreadable_file": 1}
    assert summary.skipped.examples["unreadable_file"][0].startswith(f"{shards}/e.jsonl:1")

    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    with gzip.open(shards / "b.json.gz", "rb") as f:  # the lines before the cut
        survived = []
        with pytest.raises(EOFError):
            for line in f:
                survived.append(json.loads(line)["text"])
    assert 0 < len(survived) < 40
    good = ["first good", "second good, caf\u00e9 \u65e5\u672c", "third good", *survived, "gz good"]
    assert documents(tmp_path / "out_text_document") == [ids + [tok.eod] for ids in tok.tokenize_batch(good)]
    # The summary names each reason with its first examples.
    assert f"malformed_json: 3 ({shards}/a.jsonl:2, {shards}/a.jsonl:8, {shards}/a.jsonl:12)" in summary.skipped.lines()


def test_strict_stops_with_error_naming_the_line(gpt2_files, tmp_path):
    write_lines(tmp_path / "a.jsonl", [doc("good"), b"{broken\n", doc("good again")])
    run = cli("preprocess_data.py", "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out",
              *gpt2_args(gpt2_files), "--strict")
    assert run.returncode == 2  # bad input: exit status 2, the project's rule
    assert f"{tmp_path}/a.jsonl:2: malformed json" in run.stderr
    assert not list(tmp_path.glob("out*"))
    # Without --strict the same input succeeds, keeping the good lines.
    run = cli("preprocess_data.py", "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "out",
              *gpt2_args(gpt2_files))
    assert run.returncode == 0 and IndexedDataset(str(tmp_path / "out_text_document")).num_documents == 2
    assert "malformed_json: 1" in run.stderr


def test_configuration_errors_fail_before_work(gpt2_files, sample_dir, tmp_path):
    for argv, message in [
        (["--input", tmp_path / "none-*.jsonl", *gpt2_args(gpt2_files)], "no file matches"),
        (["--input", sample_dir, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0]], "--merge-file"),
        (["--input", sample_dir, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tmp_path / "x.model"], "x.model"),
        (["--input", sample_dir, *gpt2_args(gpt2_files), "--output-prefix", tmp_path / "file" / "out"], "cannot create"),
    ]:
        (tmp_path / "file").touch()
        run = cli("preprocess_data.py", "--output-prefix", tmp_path / "out", *argv)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_dataset(gpt2_files, sample_dir, tmp_path, sig):
    """Killed mid-run: no .bin/.idx under the final names (SIGTERM also removes the temporaries),
    and no worker left behind."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", *[sample_dir / TRAIN] * 8,
         "--output-prefix", tmp_path / "out", *gpt2_args(gpt2_files), "--workers", "2", "--chunk-bytes", "50000"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("out_text_document.bin.tmp-*")):  # writing has begun
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
            time.sleep(0.01)
        time.sleep(0.1)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        proc.send_signal(sig)
        assert proc.wait(timeout=30) != 0
        psutil.wait_procs(workers, timeout=10)
    finally:  # never leave the run or its workers behind, whatever failed above
        if proc.poll() is None:
            proc.kill()
        for w in workers:
            if w.is_running():
                w.kill()
        proc.wait()
        proc.stderr.close()
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not (tmp_path / "out_text_document.bin").exists() and not (tmp_path / "out_text_document.idx").exists()
    if sig == signal.SIGTERM:
        assert os.listdir(tmp_path) == []


def test_per_input_outputs_merge_to_the_single_output(gpt2_files, sample_dir, tmp_path):
    common = ["--input", sample_dir / TRAIN, sample_dir / VALID, *gpt2_args(gpt2_files), "--append-eod",
              "--json-keys", "text", "url", "--chunk-bytes", 300_000, "--workers", 2]
    single = preprocess(*common, "--output-prefix", tmp_path / "all")
    shards = preprocess(*common, "--output-prefix", tmp_path / "shards" / "c4", "--output-per-input")
    assert shards.outputs == [str(tmp_path / "shards" / f"c4_{name}_{key}_document")
                              for name in ("c4-train.00000-of-00001", "c4-validation.00000-of-00001")
                              for key in ("text", "url")]
    assert single.documents == shards.documents == 22

    merge_datasets.main(["--input", *shards.outputs[0::2], "--output-prefix", str(tmp_path / "merged_text")])
    assert same_bytes(tmp_path / "merged_text", tmp_path / "all_text_document")
    # A directory of datasets merges in sorted order too (here: train url, then validation url).
    (tmp_path / "urls").mkdir()
    for prefix in shards.outputs[1::2]:
        for ext in (".bin", ".idx"):
            os.rename(prefix + ext, tmp_path / "urls" / (os.path.basename(prefix) + ext))
    assert merge_datasets.main(["--input", str(tmp_path / "urls"), "--output-prefix", str(tmp_path / "merged_url")]) == 0
    assert same_bytes(tmp_path / "merged_url", tmp_path / "all_url_document")


def test_merge_rejects_mixed_token_dtypes(gpt2_files, tmp_path):
    from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder

    for name, dtype in (("small", np.uint16), ("large", np.int32)):
        with IndexedDatasetBuilder(str(tmp_path / name), dtype) as b:
            b.add_document([1, 2, 3])
            b.finalize()
    run = cli("merge_datasets.py", "--input", tmp_path / "small", tmp_path / "large", "--output-prefix", tmp_path / "m")
    assert run.returncode == 2 and "different token dtypes" in run.stderr
    assert not list(tmp_path.glob("m.*"))
