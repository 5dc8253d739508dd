"""--mock-data: Megatron-LM's synthetic documents, for runs (and benchmarks) without a corpus.

Megatron's MockGPTLowLevelDataset: 100,000 documents whose lengths are drawn once from
numpy's default_rng(0) uniformly in [1, 4096); document i is the ids 1, 2, ..., length - 1 and then
the end-of-document id. Here the ids wrap below the vocabulary (1 + k mod (vocab - 2)), so a small
`--vocab-size` holds them; with 4096 ids or more they are Megatron's exactly. `MockDocuments` has the
face of an IndexedDataset, so the GPT samples, the split, the shuffling and the index cache are the
real data's (gpt_dataset.py): only where the tokens come from differs.
"""
from __future__ import annotations

import hashlib

import numpy as np

from megatron_snm.data.gpt_dataset import datasets_of

MOCK_SEED = 0
MOCK_DOCUMENTS = 100_000
MOCK_MAX_LENGTH = 4096


class MockDocuments:
    """Megatron's mock documents for a vocabulary of `vocab_size` ids ending each in `eod`."""

    prefix = "mock"

    def __init__(self, vocab_size: int, eod: int):
        if vocab_size < 3 or not 0 <= eod < vocab_size:
            raise ValueError(f"--mock-data needs a vocabulary of at least 3 ids holding its eod, got {vocab_size} "
                             f"ids and eod {eod}")
        self.vocab_size, self.eod = int(vocab_size), int(eod)
        rng = np.random.default_rng(seed=MOCK_SEED)
        self.document_lengths = rng.integers(low=1, high=MOCK_MAX_LENGTH, size=MOCK_DOCUMENTS, dtype=np.int32)
        # Names the documents for the index cache, as an .idx hash names real ones.
        self.content_hash = hashlib.sha256(
            f"mock:{MOCK_SEED}:{MOCK_DOCUMENTS}:{MOCK_MAX_LENGTH}:{self.vocab_size}:{self.eod}".encode()).hexdigest()

    @property
    def num_documents(self) -> int:
        return MOCK_DOCUMENTS

    def get_document(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        size = int(self.document_lengths[doc])
        tokens = np.empty(size, dtype=np.int64)
        tokens[:-1] = 1 + np.arange(size - 1) % (self.vocab_size - 2)
        tokens[-1] = self.eod
        end = size if length is None else offset + length
        return tokens[offset:end]

    def __repr__(self) -> str:
        return f"MockDocuments(vocab_size={self.vocab_size}, eod={self.eod})"


def build_mock_datasets(split: str, num_samples: tuple[int, int, int], seq_length: int, seed: int,
                        cache_dir: str | None, vocab_size: int, eod: int):
    """(train, valid, test) over the mock documents, as build_train_valid_test_datasets over a corpus."""
    return datasets_of([MockDocuments(vocab_size, eod)], [1.0], split, num_samples, seq_length, seed, cache_dir)
