"""Blending: megatron-core's greedy indices, proportions at every prefix, determinism, and the
builder's weighted `--data-path`."""
import math
import pickle
import warnings

import numpy as np
import pytest

from megatron_snm.data.blended_dataset import BlendedDataset
from megatron_snm.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron_snm.data.helpers import build_blending_indices
from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder


@pytest.mark.parametrize("weights", [[1.0], [0.3, 0.7], [0.5, 0.25, 0.25], list(np.random.default_rng(0).random(7))])
@pytest.mark.parametrize("size", [1, 10, 1000, 100_003])
def test_blending_indices_match_megatron_core(weights, size):
    with warnings.catch_warnings():  # megatron-core warns that apex / TE are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.helpers_cpp import build_blending_indices as mcore_build

    weights = np.asarray(weights) / np.sum(weights)
    expected_index, expected_sample = np.zeros(size, np.int16), np.zeros(size, np.int64)
    mcore_build(expected_index, expected_sample, weights, len(weights), size, False)
    index, sample = build_blending_indices(weights, size)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_array_equal(sample, expected_sample)


def fake_datasets(sizes):
    return [[{"text": np.array([k, j])} for j in range(n)] for k, n in enumerate(sizes)]


@pytest.mark.parametrize("seed", range(3))
def test_every_prefix_of_the_blend_follows_the_weights(seed):
    rng = np.random.default_rng(seed)
    weights = rng.random(int(rng.integers(2, 8)))
    size = 20_000
    blend = BlendedDataset(fake_datasets([size] * len(weights)), list(weights), size)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[blend.dataset_index], axis=0)
    expected = np.arange(1, size + 1)[:, None] * (weights / weights.sum())
    assert np.abs(counts - expected).max() < 2  # random draws would stray by ~sqrt(n)
    # Each dataset's samples are served in order, none twice.
    for k in range(len(weights)):
        np.testing.assert_array_equal(blend.dataset_sample_index[blend.dataset_index == k], np.arange(counts[-1, k]))


def test_blend_is_deterministic_and_serves_the_components_samples():
    datasets = fake_datasets([40, 80])
    a, b = BlendedDataset(datasets, [1, 2], 90), BlendedDataset(datasets, [1, 2], 90)
    np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
    served = [a[i]["text"].tolist() for i in range(len(a))]
    assert served == [b[i]["text"].tolist() for i in range(len(b))]
    assert sum(1 for k, _ in served if k == 0) == 30
    again = pickle.loads(pickle.dumps(a))
    assert [again[i]["text"].tolist() for i in range(len(a))] == served
    with pytest.raises(IndexError):
        a[90]


def test_blend_that_overdraws_a_dataset_is_refused():
    with pytest.raises(ValueError, match=r"draws \d+ samples from dataset 1 .* only 50"):
        BlendedDataset(fake_datasets([50, 50]), [1, 2], 100)
    with pytest.raises(ValueError, match="positive"):
        BlendedDataset(fake_datasets([50, 50]), [1, 0], 10)


def write_dataset(prefix, num_docs, first_id):
    rng = np.random.default_rng(first_id)
    with IndexedDatasetBuilder(str(prefix), np.int32) as builder:
        for _ in range(num_docs):
            n = int(rng.integers(1, 50))
            builder.add_document(np.arange(first_id, first_id + n))
            first_id += n
        builder.finalize()


def test_weighted_data_path_builds_blends_with_a_surplus(tmp_path):
    write_dataset(tmp_path / "a", 100, first_id=0)
    write_dataset(tmp_path / "b", 60, first_id=10**6)  # b's token ids are all >= 10**6
    data_path = ["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")]
    train, valid, test = build_train_valid_test_datasets(data_path, "90,10,0", (200, 20, 0), 16, seed=1)
    assert test is None
    for blend, n, documents in ((train, 200, [(0, 90), (0, 54)]), (valid, 20, [(90, 100), (54, 60)])):
        assert isinstance(blend, BlendedDataset) and len(blend) == n
        for part, weight, docs in zip(blend.datasets, (0.3, 0.7), documents):
            assert isinstance(part, GPTDataset) and part.documents == docs
            assert part.num_samples == math.ceil(math.ceil(n * weight) * 1.005)
        counts = np.bincount(blend.dataset_index, minlength=2)
        assert abs(counts[0] - 0.3 * n) < 1 and abs(counts[1] - 0.7 * n) < 1
        for i in range(n):
            k, j = int(blend.dataset_index[i]), int(blend.dataset_sample_index[i])
            text = blend[i]["text"]
            np.testing.assert_array_equal(text, blend.datasets[k][j]["text"])
            assert (text >= 10**6).all() == (k == 1)

    write_dataset(tmp_path / "tiny", 5, first_id=0)
    with pytest.raises(ValueError, match="no valid documents in .*tiny"):
        build_train_valid_test_datasets(["1", str(tmp_path / "a"), "1", str(tmp_path / "tiny")], "98,1,1", (10, 5, 0), 8, 1)
