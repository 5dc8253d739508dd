"""The MMIDIDX reader/writer: round trips, byte compatibility with megatron-core, bad files,
and int64 offsets past 2^31 tokens and bytes (on a sparse file, so the test stays small)."""
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from megatron_snm.data.indexed_dataset import (
    MAGIC,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_token_dtype,
    sequence_pointers,
)

with warnings.catch_warnings():  # megatron-core warns that apex / TE are absent
    warnings.simplefilter("ignore")
    from megatron.core.datasets import indexed_dataset as mcore


def random_documents(rng, num_docs, vocab, max_sequences=1):
    """[[sequence, ...] per document], sequences of random length (empty ones included)."""
    return [
        [rng.integers(0, vocab, size=rng.integers(0, 40)) for _ in range(rng.integers(1, max_sequences + 1))]
        for _ in range(num_docs)
    ]


def write_ours(prefix, docs, dtype):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for doc in docs:
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()
        builder.finalize()


def write_mcore(prefix, docs, dtype):
    builder = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(np.asarray(seq, dtype=np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def pointers_of(ds):
    """megatron-core keeps the pointers on its index reader."""
    return ds.index.sequence_pointers if isinstance(ds, mcore.IndexedDataset) else ds.sequence_pointers


def test_round_trip_sequences_documents_and_windows(tmp_path):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 30, 50_000, max_sequences=3)
    write_ours(tmp_path / "d", docs, np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    sequences = [seq for doc in docs for seq in doc]
    assert ds.dtype == np.uint16 and len(ds) == len(sequences) and ds.num_documents == len(docs)
    for i, seq in enumerate(sequences):
        np.testing.assert_array_equal(ds[i], seq)
        if len(seq) >= 3:
            np.testing.assert_array_equal(ds.get(i, 1, 2), seq[1:3])
    for d, doc in enumerate(docs):
        whole = np.concatenate(doc)
        assert ds.document_lengths[d] == len(whole)
        np.testing.assert_array_equal(ds.get_document(d), whole)
        if len(whole) >= 4:
            np.testing.assert_array_equal(ds.get_document(d, 2, len(whole) - 3), whole[2:-1])
    with pytest.raises(IndexError, match="outside"):
        ds.get(0, 0, len(sequences[0]) + 1)
    # Pickling reopens the files rather than copying the memmaps.
    assert len(pickle.dumps(ds)) < 200
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ds))[3], ds[3])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_reads_ours_and_we_read_theirs_byte_for_byte(tmp_path, dtype):
    rng = np.random.default_rng(1)
    vocab = 60_000 if dtype == np.uint16 else 200_000
    docs = random_documents(rng, 25, vocab, max_sequences=2)
    write_ours(tmp_path / "ours", docs, dtype)
    write_mcore(tmp_path / "theirs", docs, dtype)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()

    for writer, reader in (("ours", mcore.IndexedDataset), ("theirs", IndexedDataset)):
        a, b = IndexedDataset(str(tmp_path / writer)), reader(str(tmp_path / writer))
        np.testing.assert_array_equal(a.sequence_lengths, b.sequence_lengths)
        np.testing.assert_array_equal(a.sequence_pointers, pointers_of(b))
        np.testing.assert_array_equal(a.document_indices, b.document_indices)
        for i in range(len(a)):
            np.testing.assert_array_equal(a[i], b[i])
            assert a[i].dtype == b[i].dtype == dtype
            n = int(a.sequence_lengths[i])
            if n > 2:
                np.testing.assert_array_equal(a.get(i, 1, n - 2), b.get(i, offset=1, length=n - 2))


def test_best_token_dtype_follows_megatron():
    for vocab in (50_257, 65_499, 65_500, 256_000):
        assert best_token_dtype(vocab) == mcore.DType.optimal_dtype(vocab)


def test_add_index_merges_datasets(tmp_path):
    rng = np.random.default_rng(2)
    parts = [random_documents(rng, n, 1000, max_sequences=2) for n in (5, 0, 7)]
    for k, docs in enumerate(parts):
        write_ours(tmp_path / f"part{k}", docs, np.uint16)
    with IndexedDatasetBuilder(str(tmp_path / "merged"), np.uint16) as builder:
        for k in range(len(parts)):
            builder.add_index(str(tmp_path / f"part{k}"), chunk_tokens=7)
        builder.finalize()
    write_ours(tmp_path / "direct", [doc for docs in parts for doc in docs], np.uint16)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"direct{suffix}").read_bytes()


def test_interrupted_or_unfinalized_builder_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetBuilder(str(tmp_path / "a"), np.uint16) as builder:
            builder.add_document([1, 2, 3])
            raise KeyboardInterrupt
    with IndexedDatasetBuilder(str(tmp_path / "b"), np.uint16) as builder:
        builder.add_document([1, 2, 3])  # no finalize()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="do not fit"):
        IndexedDatasetBuilder(str(tmp_path / "c"), np.uint16).add_item([70_000])


def test_finalize_replaces_an_existing_pair(tmp_path):
    write_ours(tmp_path / "d", [[np.arange(10)]], np.uint16)
    write_ours(tmp_path / "d", [[np.arange(3)], [np.arange(4)]], np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.num_documents == 2 and list(ds.sequence_lengths) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def corrupt(tmp_path, edit):
    """Writes a good pair, applies edit(idx_bytes, bin_bytes) -> (idx, bin), returns the prefix."""
    prefix = tmp_path / "d"
    write_ours(prefix, [[np.arange(5)], [np.arange(7)]], np.uint16)
    idx, data = edit(bytearray((tmp_path / "d.idx").read_bytes()), bytearray((tmp_path / "d.bin").read_bytes()))
    (tmp_path / "d.idx").write_bytes(bytes(idx))
    (tmp_path / "d.bin").write_bytes(bytes(data))
    return str(prefix)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda i, b: (b"NOTANIDX" + i[8:], b), "not an MMIDIDX index"),
        (lambda i, b: (i[:9] + struct.pack("<Q", 2) + i[17:], b), "unsupported index version 2"),
        (lambda i, b: (i[:17] + bytes([42]) + i[18:], b), "unknown dtype code 42"),
        (lambda i, b: (i[:20], b), "truncated index"),
        (lambda i, b: (i[:-8], b), "truncated index"),
        (lambda i, b: (i, b[:-2]), "truncated or mismatched data file"),
        (lambda i, b: (i, b + b"\0\0"), "mismatched data file"),
        # Sequence lengths that run past the end of the .bin.
        (lambda i, b: (i[:38] + struct.pack("<i", 9) + i[42:], b), "truncated or mismatched data file"),
        # The layout of the pair written by corrupt(): lengths at byte 34, pointers at 42,
        # document indices [0, 1, 2] at 58.
        (lambda i, b: (i[:50] + struct.pack("<q", 12) + i[58:], b),
         r"d\.idx: corrupt index: sequence 1 starts at byte 12, but the lengths before it place it at byte 10"),
        (lambda i, b: (i[:34] + struct.pack("<i", -1) + i[38:], b), r"d\.idx: corrupt index: sequence 0 has length -1"),
        (lambda i, b: (i[:58] + struct.pack("<q", 1) + i[66:], b), r"document indices must start with 0"),
        (lambda i, b: (i[:66] + struct.pack("<q", 3) + i[74:], b), r"document 1 starts at sequence 3 of 2"),
        (lambda i, b: (i[:66] + struct.pack("<qq", 2, 1), b), r"document 2 starts at sequence 1, before document 1"),
        (lambda i, b: (i[:66] + struct.pack("<qq", 1, 1), b), r"document indices do not cover the 2 sequences"),
        (lambda i, b: (i + bytes(8), b), r"d\.idx: 8 bytes after the end of the index"),
        (lambda i, b: (i, b + b"\0"), r"d\.bin: 25 bytes is not a whole number of uint16 tokens"),
        (lambda i, b: (i, b[:-1]), r"d\.bin: 23 bytes is not a whole number of uint16 tokens"),
    ],
)
def test_bad_files_are_named_in_clear_errors(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit)
    with pytest.raises(IndexedDatasetError, match=message) as err:
        IndexedDataset(prefix)
    assert "d.idx" in str(err.value) or "d.bin" in str(err.value)


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file_names_path_and_prefix(tmp_path, missing):
    write_ours(tmp_path / "d", [[np.arange(5)]], np.uint16)
    (tmp_path / f"d{missing}").unlink()
    with pytest.raises(IndexedDatasetError, match=rf"d\{missing}: no such file .*prefix"):
        IndexedDataset(str(tmp_path / "d"))


def test_offsets_past_2_to_the_31_tokens_and_bytes(tmp_path):
    """Three int32 sequences of 2^30 tokens (4 GiB each) in a sparse .bin, one document."""
    n = 1 << 30
    lengths = np.full(3, n, dtype=np.int32)
    pointers = sequence_pointers(lengths, np.int32)
    assert pointers.tolist() == [0, 4 << 30, 8 << 30]
    with open(tmp_path / "big.idx", "wb") as f:  # the layout written out by hand
        f.write(MAGIC + struct.pack("<QBQQ", 1, 4, 3, 2))
        f.write(lengths.tobytes() + pointers.tobytes() + np.array([0, 3], np.int64).tobytes())
    tail = np.array([7, 8, 9], dtype=np.int32)
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(12 << 30)  # sparse: no disk blocks behind the zeros
        f.seek((12 << 30) - tail.nbytes)
        f.write(tail.tobytes())

    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds.document_lengths.tolist() == [3 * n]  # more tokens than int32 holds
    np.testing.assert_array_equal(ds.get(2, n - 3, 3), tail)
    np.testing.assert_array_equal(ds.get_document(0, 3 * n - 4, 4), [0, 7, 8, 9])
    theirs = mcore.IndexedDataset(str(tmp_path / "big"))
    np.testing.assert_array_equal(pointers_of(theirs), pointers)
    np.testing.assert_array_equal(theirs.get(2, offset=n - 3, length=3), tail)


def test_the_whole_index_is_validated_chunk_by_chunk(tmp_path, monkeypatch):
    """Small chunks, so the check crosses chunk boundaries: a damaged entry deep in the index is
    found and named, whichever chunk holds it."""
    from megatron_snm.data import indexed_dataset

    monkeypatch.setattr(indexed_dataset, "_VALIDATE_CHUNK", 7)
    rng = np.random.default_rng(3)
    docs = random_documents(rng, 40, 1000, max_sequences=2)
    write_ours(tmp_path / "d", docs, np.uint16)
    good = IndexedDataset(str(tmp_path / "d"))
    lengths = [len(seq) for doc in docs for seq in doc]
    assert good.sequence_pointers.tolist() == [2 * sum(lengths[:i]) for i in range(len(lengths))]
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    n_seq, n_doc = len(good), good.num_documents + 1
    for victim in (6, 7, 20, n_seq - 1):  # either side of a chunk boundary, and the last entry
        edited = bytearray(raw)
        at = 34 + 4 * n_seq + 8 * victim
        edited[at : at + 8] = struct.pack("<q", int(good.sequence_pointers[victim]) + 2)
        (tmp_path / "e.idx").write_bytes(bytes(edited))
        (tmp_path / "e.bin").write_bytes((tmp_path / "d.bin").read_bytes())
        with pytest.raises(IndexedDatasetError, match=rf"e\.idx: corrupt index: sequence {victim} starts at byte"):
            IndexedDataset(str(tmp_path / "e"))
    for victim in (7, 8, n_doc - 2):  # a document index that falls back, around the boundaries
        edited = bytearray(raw)
        at = 34 + 12 * n_seq + 8 * victim
        edited[at : at + 8] = struct.pack("<q", int(good.document_indices[victim - 1]) - 1)
        (tmp_path / "e.idx").write_bytes(bytes(edited))
        with pytest.raises(IndexedDatasetError, match=r"e\.idx: corrupt index: document \d+ starts at sequence"):
            IndexedDataset(str(tmp_path / "e"))


def test_content_hash_and_max_token_id(tmp_path):
    import hashlib

    write_ours(tmp_path / "d", [[np.array([5, 9, 3])], [np.array([70, 2])]], np.uint16)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.content_hash == hashlib.sha256((tmp_path / "d.idx").read_bytes()).hexdigest()
    assert ds.max_token_id() == 70 and ds.max_token_id(chunk_tokens=2) == 70
    write_ours(tmp_path / "empty", [], np.uint16)
    assert IndexedDataset(str(tmp_path / "empty")).max_token_id() == -1


def test_two_builders_of_one_prefix_never_share_a_temporary(tmp_path):
    """Once the same temporary name for every builder of a process: a second builder of the
    same prefix deleted the first's dataset and left a .bin without .idx."""
    first = IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16)
    second = IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16)
    first.add_document([1, 2, 3])
    second.add_document([4, 5])
    first.finalize()
    assert IndexedDataset(str(tmp_path / "d")).get_document(0).tolist() == [1, 2, 3]
    second.finalize()
    assert IndexedDataset(str(tmp_path / "d")).get_document(0).tolist() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_an_aborted_builder_leaves_the_existing_pair_untouched(tmp_path):
    write_ours(tmp_path / "d", [[np.arange(4)]], np.uint16)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16) as builder:
            builder.add_document(np.arange(100))
            raise RuntimeError("killed before finalize")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_without_replace_a_pair_that_appeared_meanwhile_is_left_alone(tmp_path):
    """Two runs into one new prefix: the later finalize must not replace the earlier's dataset."""
    builder = IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16)
    builder.add_document([7, 8, 9])
    write_ours(tmp_path / "d", [[np.arange(4)]], np.uint16)  # the other run publishes first
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if ".tmp-" not in p.name}
    with pytest.raises(IndexedDatasetError, match=r"d\.bin: appeared while this run was writing"):
        builder.finalize(replace=False)
    builder.abort()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Into a free prefix, replace=False publishes as usual.
    with IndexedDatasetBuilder(str(tmp_path / "e"), np.uint16) as other:
        other.add_document([1])
        other.finalize(replace=False)
    assert IndexedDataset(str(tmp_path / "e")).get_document(0).tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx", "e.bin", "e.idx"]
