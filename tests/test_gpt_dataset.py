"""GPTDataset: sample boundaries identical to megatron-core's build_sample_idx, samples that are
the shuffled documents back to back, determinism, caching, rank-0 builds, split rounding and
the train/valid/test builder's errors."""
import os
import pickle
import warnings

import numpy as np
import pytest

from megatron_snm.data import gpt_dataset
from megatron_snm.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, split_document_ranges
from megatron_snm.data.helpers import build_document_sample_index, build_shuffle_index
from megatron_snm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megatron_snm.parallel.spawn import run_distributed



@pytest.fixture(scope="module")
def mcore():
    """megatron-core's dataset helpers, imported only by the tests that compare against them
    (the import is slow, and the spawned ranks of the distributed test import this module)."""
    with warnings.catch_warnings():  # it warns that apex / TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_megatron_dataset_config, helpers
    return blended_megatron_dataset_config, helpers


def write_dataset(prefix, num_docs, seed=0, max_sequences=1, max_len=60):
    """Documents of 0..max_len tokens whose ids count up, so every token is distinct."""
    rng = np.random.default_rng(seed)
    next_id = 0
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for _ in range(num_docs):
            for _ in range(rng.integers(1, max_sequences + 1)):
                n = int(rng.integers(0, max_len))
                builder.add_item(np.arange(next_id, next_id + n))
                next_id += n
            builder.end_document()
        builder.finalize()
    return IndexedDataset(str(prefix))


@pytest.mark.parametrize(
    "num_docs, begin, end, epochs, separate, seq_length",
    [(50, 0, 50, 1, False, 16), (50, 10, 40, 3, False, 7), (50, 5, 45, 4, True, 33), (400_000, 1000, 300_000, 2, True, 128)],
)
def test_sample_index_matches_megatron_core(mcore, num_docs, begin, end, epochs, separate, seq_length):
    rng = np.random.default_rng(num_docs + epochs)
    sizes = rng.integers(0, 300, size=num_docs).astype(np.int32)  # empty documents included
    sizes[rng.integers(0, num_docs, 5)] = 1000  # and some longer than a sample
    document_index, sample_index = build_document_sample_index(sizes, begin, end, epochs, separate, seq_length, 1234)
    tokens_per_epoch = int(sizes[begin:end].sum())
    expected = mcore[1].build_sample_idx(sizes, document_index, seq_length, epochs, tokens_per_epoch)
    np.testing.assert_array_equal(sample_index, expected)
    assert sample_index.dtype == expected.dtype
    # Every document of the range, once per epoch; a separate final epoch is a whole epoch.
    assert np.array_equal(np.sort(document_index), np.repeat(np.arange(begin, end), epochs))
    if separate:
        assert np.array_equal(np.sort(document_index[-(end - begin) :]), np.arange(begin, end))
    assert not np.array_equal(document_index[: end - begin], np.arange(begin, end))  # shuffled


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_shuffles_are_uniform():
    # Small: the 24 orders of 4 items over 24,000 seeds (chi-square, 23 degrees of freedom).
    orders = {}
    for seed in range(24_000):
        key = tuple(build_shuffle_index(4, 4, seed))
        orders[key] = orders.get(key, 0) + 1
    assert len(orders) == 24 and chi_square(np.array(list(orders.values()))) < 60  # p ~ 1e-4
    # Large enough for several buckets: where each eighth of the items lands (49 dof).
    n = 1 << 20
    index = build_shuffle_index(n, n, 99)
    source_block = (np.asarray(index, dtype=np.int64) * 8) // n
    destination_block = (np.arange(n) * 8) // n
    table = np.bincount(source_block * 8 + destination_block, minlength=64)
    assert chi_square(table) < 100  # p ~ 3e-5
    # and within buckets: ascents between neighbours, (n - 1) / 2 +- sqrt(n / 12) when uniform.
    assert abs(np.mean(np.diff(np.asarray(index, dtype=np.int64)) > 0) - 0.5) < 0.002


def stream_of(ds: GPTDataset) -> np.ndarray:
    """The shuffled documents back to back: the text the samples are cut from."""
    return np.concatenate([ds.indexed.get_document(int(d)) for d in ds.document_index])


@pytest.mark.parametrize("max_sequences", [1, 3])
def test_samples_are_consecutive_windows_of_the_shuffled_documents(tmp_path, max_sequences):
    indexed = write_dataset(tmp_path / "d", 40, max_sequences=max_sequences)
    seq = 9
    ds = GPTDataset(indexed, (3, 37), num_samples=400, seq_length=seq, seed=7, cache_dir=str(tmp_path / "c"))
    stream = stream_of(ds)
    assert len(ds) >= 400 and len(ds.document_index) % (37 - 3) == 0
    samples = {}
    for i in range(len(ds)):
        text = ds[i]["text"]
        j = int(ds.shuffle_index[i])
        assert text.dtype == np.int64 and text.shape == (seq + 1,)
        np.testing.assert_array_equal(text, stream[j * seq : j * seq + seq + 1])
        samples[j] = text
    assert sorted(samples) == list(range(len(ds)))  # the shuffle index is a permutation
    for j in range(len(ds) - 1):
        assert samples[j][-1] == samples[j + 1][0]  # consecutive samples share one token
    assert len(ds.document_index) >= 2 * (37 - 3)  # the samples needed several epochs


def test_epochs_and_separate_final_epoch(tmp_path):
    indexed = write_dataset(tmp_path / "d", 30)
    tokens = int(indexed.document_lengths.sum())
    seq = 8
    per_epoch = (tokens - 1) // seq
    # A little more than two epochs: the third is shuffled apart and its samples served last.
    ds = GPTDataset(indexed, (0, 30), 2 * per_epoch + 3, seq, seed=1, cache_dir=str(tmp_path / "c"))
    assert len(ds.document_index) == 3 * 30
    assert sorted(ds.document_index[-30:]) == list(range(30))
    before_final = (2 * tokens - 1) // seq
    assert sorted(ds.shuffle_index[:before_final]) == list(range(before_final))
    # Most of a second epoch: one shuffle over both epochs, samples mixed throughout.
    ds = GPTDataset(indexed, (0, 30), 2 * per_epoch - 2, seq, seed=1, cache_dir=str(tmp_path / "c"))
    assert len(ds.document_index) == 2 * 30
    assert sorted(ds.document_index[-30:]) != list(range(30))


def test_deterministic_under_seed_and_different_under_another(tmp_path):
    indexed = write_dataset(tmp_path / "d", 200)
    build = lambda seed, cache: GPTDataset(indexed, (0, 200), 300, 16, seed, cache_dir=str(tmp_path / cache))
    a, b, c = build(5, "a"), build(5, "b"), build(6, "c")
    for key in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.document_index, c.document_index)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert [a[i]["text"].tolist() for i in range(20)] == [b[i]["text"].tolist() for i in range(20)]


def test_cache_is_reused_and_keyed_by_every_parameter(tmp_path, monkeypatch):
    indexed = write_dataset(tmp_path / "d", 100)
    first = GPTDataset(indexed, (0, 100), 200, 16, seed=3)  # default cache: beside the data
    cache = tmp_path / "index-cache"
    files = set(os.listdir(cache))
    assert len(files) == 4 and not any(".tmp" in f for f in files)

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached index")

    monkeypatch.setattr(gpt_dataset, "build_document_sample_index", must_not_build)
    again = GPTDataset(indexed, (0, 100), 200, 16, seed=3)
    assert isinstance(again.sample_index, np.memmap)
    np.testing.assert_array_equal(again.sample_index, first.sample_index)
    np.testing.assert_array_equal(again[5]["text"], first[5]["text"])
    assert set(os.listdir(cache)) == files

    monkeypatch.undo()
    for changed in [dict(num_samples=201), dict(seq_length=15), dict(seed=4), dict(documents=(1, 100))]:
        kwargs = dict(documents=(0, 100), num_samples=200, seq_length=16, seed=3)
        kwargs.update(changed)
        GPTDataset(indexed, **kwargs)
        new = set(os.listdir(cache)) - files
        assert len(new) == 4, changed
        files |= new

    # Workers under spawn receive the dataset pickled: paths, not the index arrays.
    assert len(pickle.dumps(first)) < 4096
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(first))[7]["text"], first[7]["text"])


def _rank_builds(rank, world_size, prefix, cache_dir):
    from megatron_snm.data import gpt_dataset as g
    from megatron_snm.data.indexed_dataset import IndexedDataset as Indexed

    real_build = g.build_document_sample_index

    def failing(*args, **kwargs):
        raise OSError("disk full")

    def not_here(*args, **kwargs):
        raise AssertionError(f"rank {rank} built indices")

    indexed = Indexed(prefix)
    # Rank 0 fails: every rank raises, none hangs.
    g.build_document_sample_index = failing if rank == 0 else not_here
    try:
        g.GPTDataset(indexed, (0, 60), 100, 12, seed=9, cache_dir=cache_dir)
        failure = None
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
    # Rank 0 builds; the others only map its files.
    g.build_document_sample_index = real_build if rank == 0 else not_here
    ds = g.GPTDataset(indexed, (0, 60), 100, 12, seed=9, cache_dir=cache_dir)
    return failure, np.asarray(ds.document_index), np.asarray(ds.sample_index), [ds[i]["text"] for i in range(len(ds))]


def test_rank0_builds_and_other_ranks_map_the_same_indices(tmp_path):
    write_dataset(tmp_path / "d", 60)
    (f0, doc0, sample0, texts0), (f1, doc1, sample1, texts1) = run_distributed(
        _rank_builds, 2, str(tmp_path / "d"), str(tmp_path / "cache")
    )
    assert f0 == "OSError: disk full"
    assert f1.startswith("RuntimeError") and "rank 0 failed" in f1 and "disk full" in f1
    np.testing.assert_array_equal(doc0, doc1)
    np.testing.assert_array_equal(sample0, sample1)
    assert all(np.array_equal(a, b) for a, b in zip(texts0, texts1)) and len(texts0) == len(texts1) >= 100


@pytest.mark.parametrize("split", ["969,30,1", "98,2,0", "1,1,1", "80,20", "100", "0,1,0", "2,0.5,0.5"])
@pytest.mark.parametrize("num_documents", [0, 1, 7, 100, 12345, 10**9 + 7])
def test_split_rounding_follows_megatron_core(mcore, split, num_documents):
    config = mcore[0]
    expected = []
    for bookend in config.convert_split_vector_to_split_matrix(config.parse_and_normalize_split(split)):
        if bookend is None:
            expected.append(None)
        else:
            expected.append((int(round(bookend[0] * num_documents)), int(round(bookend[1] * num_documents))))
    ours = split_document_ranges(split, num_documents)
    for mine, theirs in zip(ours, expected):
        if theirs is None:
            assert mine[0] == mine[1]  # an empty range
        else:
            assert mine == theirs
    assert ours[0][0] == 0 and ours[-1][1] == num_documents
    assert all(a[1] == b[0] for a, b in zip(ours, ours[1:]))


def test_builder_single_prefix(tmp_path):
    write_dataset(tmp_path / "d", 100)
    train, valid, test = build_train_valid_test_datasets([str(tmp_path / "d")], "90,10,0", (50, 5, 5), 16, seed=1)
    assert train.documents == (0, 90) and valid.documents == (90, 100) and test is None
    assert len(train) >= 50 and len(valid) >= 5 and train.seq_length == 16
    train, valid, test = build_train_valid_test_datasets(str(tmp_path / "d"), "90,10,0", (50, 0, 0), 16, seed=1)
    assert valid is None and test is None


@pytest.mark.parametrize(
    "data_path, split, message",
    [
        (["1", "{d}", "{d}"], "969,30,1", "expected PREFIX or WEIGHT PREFIX pairs"),
        (["heavy", "{d}", "0.5", "{d}"], "969,30,1", "weight 'heavy' is not a number"),
        (["-1", "{d}", "1", "{d}"], "969,30,1", "must be positive"),
        (["{d}"], "90,x,10", "--split '90,x,10'"),
        (["{d}"], "1,2,3,4", "--split '1,2,3,4'"),
        (["{d}"], "0,0,0", "--split '0,0,0'"),
    ],
)
def test_builder_rejects_bad_arguments_before_any_work(tmp_path, data_path, split, message):
    write_dataset(tmp_path / "d", 10)
    data_path = [p.format(d=tmp_path / "d") for p in data_path]
    with pytest.raises(ValueError, match=message):
        build_train_valid_test_datasets(data_path, split, (10, 1, 1), 8, seed=1)
    assert not (tmp_path / "index-cache").exists()


def test_builder_names_a_missing_prefix_before_building(tmp_path):
    write_dataset(tmp_path / "d", 10)
    with pytest.raises(IndexedDatasetError, match=r"missing\.idx: no such file .*missing"):
        build_train_valid_test_datasets(["1", str(tmp_path / "d"), "1", str(tmp_path / "missing")], "1,0,0", (5, 0, 0), 8, 1)
    assert not (tmp_path / "index-cache").exists()
    empty = write_dataset(tmp_path / "empty", 3, max_len=1)  # 3 documents of 0 tokens
    with pytest.raises(ValueError, match="empty.*hold 0 tokens"):
        GPTDataset(empty, (0, 3), 5, 8, seed=1)


def write_lengths(prefix, lengths):
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for n in lengths:
            builder.add_document(np.arange(n))
        builder.finalize()
    return IndexedDataset(str(prefix))


def test_a_reprocessed_prefix_never_reuses_the_old_contents_cache(tmp_path):
    """Same name, same document count, same .idx size (the old cache key), other lengths: the
    indices must be rebuilt, or samples cross document ends the new data does not have."""
    rng = np.random.default_rng(0)
    old_lengths = rng.integers(1, 60, size=100)
    old = write_lengths(tmp_path / "d", old_lengths)
    GPTDataset(old, (0, 100), 200, 16, seed=3)
    cached = set(os.listdir(tmp_path / "index-cache"))
    size = os.path.getsize(tmp_path / "d.idx")

    new = write_lengths(tmp_path / "d", rng.permutation(old_lengths) + 1)  # re-preprocessed
    assert os.path.getsize(tmp_path / "d.idx") == size
    fresh = GPTDataset(new, (0, 100), 200, 16, seed=3)
    assert len(set(os.listdir(tmp_path / "index-cache")) - cached) == 4
    reference = GPTDataset(new, (0, 100), 200, 16, seed=3, cache_dir=str(tmp_path / "elsewhere"))
    np.testing.assert_array_equal(fresh.sample_index, reference.sample_index)
    assert all(np.array_equal(fresh[i]["text"], reference[i]["text"]) for i in range(len(fresh)))


@pytest.mark.parametrize("damage", ["truncate", "reshape"])
def test_a_damaged_cache_file_is_named_in_a_clear_error(tmp_path, damage):
    indexed = write_dataset(tmp_path / "d", 50)
    ds = GPTDataset(indexed, (0, 50), 100, 16, seed=1)
    path = ds.paths["sample_index"]
    if damage == "truncate":
        open(path, "r+b").truncate(os.path.getsize(path) // 2)
        message = "damaged index cache"
    else:
        np.save(path, np.zeros((5, 2), dtype=np.int32))
        message = "index cache does not match its description"
    with pytest.raises(gpt_dataset.DataError, match=rf"{path}: {message}.*delete"):
        GPTDataset(indexed, (0, 50), 100, 16, seed=1)


def test_empty_and_one_token_datasets_are_clear_errors(tmp_path):
    one = write_lengths(tmp_path / "one", [1])
    with pytest.raises(gpt_dataset.DataError, match=r"one\.bin: the train documents \[0, 1\) hold 1 tokens; a sample needs"):
        GPTDataset(one, (0, 1), 5, 8, seed=1)
    write_lengths(tmp_path / "none", [])
    with pytest.raises(gpt_dataset.DataError, match=r"gives the train set no documents of .*none \(0 documents\)"):
        build_train_valid_test_datasets(str(tmp_path / "none"), "1,0,0", (5, 0, 0), 8, seed=1)
    tiny = write_lengths(tmp_path / "tiny", [3, 2])  # 5 tokens asked for 10^9 samples of 2048
    with pytest.raises(gpt_dataset.DataError, match=r"tiny\.bin: 1,000,000,000 train samples .* would repeat"):
        GPTDataset(tiny, (0, 2), 10**9, 2048, seed=1)


def test_a_split_that_starves_validation_is_refused_but_an_empty_test_split_is_not(tmp_path):
    write_dataset(tmp_path / "d", 10)
    with pytest.raises(gpt_dataset.DataError, match=r"--split '969,30,1' gives the valid set no documents .*--eval-iters 0"):
        build_train_valid_test_datasets(str(tmp_path / "d"), "969,30,1", (10, 4, 4), 8, seed=1)
    with pytest.raises(gpt_dataset.DataError, match=r"--split '100,0,0' gives the valid set no documents"):
        build_train_valid_test_datasets(str(tmp_path / "d"), "100,0,0", (10, 4, 0), 8, seed=1)
    train, valid, test = build_train_valid_test_datasets(str(tmp_path / "d"), "969,30,1", (10, 0, 4), 8, seed=1)
    assert train is not None and valid is None and test is None  # no validation asked for; test empty
    train, valid, test = build_train_valid_test_datasets(str(tmp_path / "d"), "8,2,0", (10, 4, 4), 8, seed=1)
    assert valid.documents == (8, 10) and test is None


@pytest.mark.parametrize("split", ["nan,1,1", "1,,1", "-1,2,0", "inf,1,0", "", "a/b", "1 2 3"])
def test_malformed_splits_are_data_errors_naming_the_flag(tmp_path, split):
    write_dataset(tmp_path / "d", 10)
    with pytest.raises(gpt_dataset.DataError, match=r"--split "):
        build_train_valid_test_datasets(str(tmp_path / "d"), split, (10, 1, 1), 8, seed=1)
