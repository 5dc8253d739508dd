"""Token ids outside the run's vocabulary stop training with a message naming the dataset, the
sample and the id (they once trained silently under TP=2 and crashed with an IndexError under
TP=1); ids inside it pass, and the batches are what they were without the check."""
import numpy as np
import pytest
import torch

from megatron_snm.data.blended_dataset import BlendedDataset
from megatron_snm.data.errors import DataError
from megatron_snm.data.gpt_dataset import GPTDataset
from megatron_snm.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_snm.data.vocabulary_check import check_token_ids
from megatron_snm.training.data import micro_batches


def dataset(tmp_path, name, ids, dtype=np.uint16, seq_length=8):
    with IndexedDatasetBuilder(str(tmp_path / name), dtype) as builder:
        for start in range(0, len(ids), 10):
            builder.add_document(ids[start : start + 10])
        builder.finalize()
    indexed = IndexedDataset(str(tmp_path / name))
    return GPTDataset(indexed, (0, indexed.num_documents), 20, seq_length, seed=1, cache_dir=str(tmp_path / "cache"))


def all_batches(ds, vocab_size):
    total = len(ds) // 2 * 2
    return list(micro_batches(ds, 0, total, 2, 0, 1, torch.device("cpu"), vocab_size=vocab_size))


def test_ids_inside_the_vocabulary_pass_and_change_nothing(tmp_path):
    ds = dataset(tmp_path, "ok", np.arange(200) % 100)
    checked, unchecked = all_batches(ds, 100), all_batches(ds, None)
    assert len(checked) == len(ds) // 2
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(checked, unchecked))


def test_an_id_past_the_vocabulary_names_dataset_sample_and_id(tmp_path):
    ids = np.arange(200) % 100
    ids[137] = 50_300  # e.g. data tokenized with a larger vocabulary
    ds = dataset(tmp_path, "big", ids)
    sample = next(i for i in range(len(ds)) if 50_300 in ds[i]["text"])
    position = int(np.flatnonzero(ds[sample]["text"] == 50_300)[0])
    with pytest.raises(DataError) as err:
        all_batches(ds, 50_257)
    assert str(err.value) == (
        f"{tmp_path}/big (train sample {sample}): token id 50300 at position {position} is outside the model's "
        "vocabulary of 50257 ids (preprocessed with another tokenizer? check --tokenizer-type and its files)")


def test_negative_ids_and_blends_name_the_dataset_the_sample_came_from(tmp_path):
    good = dataset(tmp_path, "good", np.arange(200) % 50, dtype=np.int32)
    ids = np.arange(200) % 50
    ids[::7] = -3  # in every sample
    bad = dataset(tmp_path, "bad", ids, dtype=np.int32)
    blend = BlendedDataset([good, bad], [0.5, 0.5], 30)
    culprit = next(i for i in range(len(blend)) if (blend[i]["text"] < 0).any())
    with pytest.raises(DataError, match=rf"{tmp_path}/bad \(train sample \d+\), blend sample {culprit}: token id -3"):
        check_token_ids(torch.from_numpy(np.stack([blend[i]["text"] for i in range(30)])), 50, blend, list(range(30)))


def test_a_dataset_with_ids_past_the_vocabulary_is_refused_when_opened(tmp_path, monkeypatch):
    from megatron_snm.data import indexed_dataset
    from megatron_snm.data.gpt_dataset import build_train_valid_test_datasets

    ids = np.arange(300) % 90
    ids[250] = 1234
    dataset(tmp_path, "d", ids)
    prefix = str(tmp_path / "d")
    with pytest.raises(DataError, match=rf"^{prefix}\.bin: holds token id 1234, but the tokenizer has only 1000 ids"):
        build_train_valid_test_datasets(prefix, "1,0,0", (10, 0, 0), 8, seed=1, vocab_size=1000)
    # The scan is cached under the data's identity: the second open reads the answer.
    monkeypatch.setattr(indexed_dataset.IndexedDataset, "max_token_id", lambda self: pytest.fail("scanned again"))
    train, _, _ = build_train_valid_test_datasets(prefix, "1,0,0", (10, 0, 0), 8, seed=1, vocab_size=1235)
    assert len(train) >= 10
    monkeypatch.undo()
    # Re-preprocessed in place with other ids: scanned afresh.
    dataset(tmp_path, "d", np.arange(300) % 90)
    assert build_train_valid_test_datasets(prefix, "1,0,0", (10, 0, 0), 8, seed=1, vocab_size=90)[0] is not None
    assert len(list((tmp_path / "index-cache").glob("d-*-max_token_id.json"))) == 2
