"""The unigram level of a dataset: the loss of a model that ignores the context.

    loss = unigram_loss("data/c4_text_document", "980,20,0")

The cross entropy (nats per token) of the validation documents' tokens under the token frequencies
of the training documents, with the same document split as pretrain_gpt.py's --split. A language
model that ends above it has learnt no more than which tokens are frequent; the stability study
states it beside its final losses. Frequencies get add-1/2 smoothing so that a token unseen in
training keeps a finite loss.
"""
from __future__ import annotations

import numpy as np

from megatron_snm.data.gpt_dataset import split_document_ranges
from megatron_snm.data.indexed_dataset import IndexedDataset


def _counts(dataset: IndexedDataset, first: int, last: int, size: int) -> np.ndarray:
    counts = np.zeros(size, np.int64)
    for doc in range(first, last):
        counts += np.bincount(dataset.get_document(doc).astype(np.int64), minlength=size)[:size]
    return counts


def unigram_loss(prefix: str, split: str) -> dict:
    """{"loss", "ppl", "train_tokens", "valid_tokens"} of one dataset prefix under `split`."""
    dataset = IndexedDataset(prefix)
    (train_lo, train_hi), (valid_lo, valid_hi), _ = split_document_ranges(split, dataset.num_documents)
    if valid_hi <= valid_lo:
        raise ValueError(f"{prefix}: --split {split} leaves no validation documents")
    size = dataset.max_token_id() + 1
    train, valid = _counts(dataset, train_lo, train_hi, size), _counts(dataset, valid_lo, valid_hi, size)
    probs = (train + 0.5) / (train.sum() + 0.5 * size)
    loss = float(-(valid * np.log(probs)).sum() / valid.sum())
    return dict(loss=loss, ppl=float(np.exp(loss)), train_tokens=int(train.sum()), valid_tokens=int(valid.sum()))
