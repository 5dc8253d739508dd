"""Token ids the model cannot represent stop the run with a message, instead of training silently.

Data preprocessed with a larger vocabulary than the run's tokenizer, or ids in the padding above
the real vocabulary, would otherwise look up zero rows of a vocabulary-parallel embedding under
TP > 1 (silently wrong) or fail with a bare IndexError under TP = 1. A min and a max over the
micro-batch cost next to nothing; only a bad batch pays for finding the first bad id.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron_snm.data.errors import DataError


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
