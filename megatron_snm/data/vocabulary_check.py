"""Token ids the model cannot represent stop the run with a message, instead of training silently.

Data preprocessed with a larger vocabulary than the run's tokenizer, or ids in the padding above
the real vocabulary, would otherwise look up zero rows of a vocabulary-parallel embedding under
TP > 1 (silently wrong) or fail with a bare IndexError under TP = 1. A min and a max over the
micro-batch cost next to nothing; only a bad batch pays for finding the first bad id.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megatron_snm.data.errors import DataError
from megatron_snm.data.indexed_dataset import IndexedDataset
from megatron_snm.data.tokenizer_description import SUFFIX, read_description


def check_token_ids(text: torch.Tensor, vocab_size: int, dataset, indices: Sequence[int]) -> None:
    """Raises DataError if an id of `text` ([samples, tokens], row r being sample `indices[r]` of
    `dataset`) lies outside [0, vocab_size), naming the dataset prefix, the sample and the id."""
    if text.numel() == 0:
        return
    low, high = torch.aminmax(text)
    if low >= 0 and high < vocab_size:
        return
    bad = torch.nonzero((text < 0) | (text >= vocab_size))[0]
    row, column = int(bad[0]), int(bad[1])
    idx = int(indices[row])
    origin = dataset.sample_origin(idx) if hasattr(dataset, "sample_origin") else f"{dataset!r} sample {idx}"
    raise DataError(
        f"{origin}: token id {int(text[row, column])} at position {column} is outside the model's vocabulary of "
        f"{vocab_size} ids (preprocessed with another tokenizer? check --tokenizer-type and its files)"
    )


# A dataset without a tokenizer description (data/tokenizer_description.py): its largest id hints at
# whether it was made with another tokenizer.
FAR_BELOW = 0.5
_SCANNED_TOKENS = 1 << 25  # the largest id is looked for in at most this many tokens (64 MiB of uint16)


def largest_token_id(prefix: str) -> int | None:
    """The largest id in (at most the first 32 Mi tokens of) dataset `prefix`'s `.bin`."""
    dataset = IndexedDataset(prefix)
    total = int(np.sum(dataset.sequence_lengths, dtype=np.int64))
    if total == 0:
        return None
    tokens = np.frombuffer(dataset._bin, dtype=dataset.dtype, count=min(total, _SCANNED_TOKENS))
    return int(tokens.max())


def undescribed_warning(prefix: str, vocab_size: int) -> str | None:
    """For a dataset without a description (one made by Megatron-LM, or before descriptions): a
    one-line warning when its largest token id lies far below `vocab_size`, else None."""
    if read_description(prefix) is not None:
        return None
    largest = largest_token_id(prefix)
    if largest is None or largest >= FAR_BELOW * vocab_size:
        return None
    return (f"warning: {prefix} has no {SUFFIX} and its largest token id is {largest:,}, far below this "
            f"tokenizer's {vocab_size:,} tokens: was it made with another (smaller) tokenizer?")
