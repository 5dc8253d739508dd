"""Micro-batches for each data-parallel rank, resumable at the exact sample.

The training set is read in order from `consumed_samples` (Megatron's pretraining sampler): each
global batch is the next `global_batch_size` sample indices, cut into micro-batches of
`micro_batch_size` per DP rank. A checkpoint's consumed-samples count therefore restores the data
position exactly, whatever the launcher; the datasets themselves are already shuffled by seed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from megatron_snm.data.vocabulary_check import check_token_ids


def micro_batch_indices(consumed_samples: int, total_samples: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    """Indices of this DP rank's micro-batches, in order, from `consumed_samples` on."""
    step = micro_batch_size * dp_size
    for start in range(consumed_samples, total_samples - step + 1, step):
        first = start + dp_rank * micro_batch_size
        yield list(range(first, first + micro_batch_size))


def _collate(dataset, indices: list[int], vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.from_numpy(np.stack([np.asarray(dataset[i]["text"], dtype=np.int64) for i in indices]))
    if vocab_size is not None:
        check_token_ids(text, vocab_size, dataset, indices)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()  # tokens, labels


def micro_batches(dataset, consumed_samples: int, total_samples: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, device: torch.device,
                  vocab_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [m, s], labels [m, s]) for this DP rank. `total_samples` may exceed len(dataset)
    only if the dataset wraps around itself (GPTDataset builds exactly what it is asked for).
    With `vocab_size` (the tokenizer's, before padding), an id outside it raises DataError."""
    if total_samples > len(dataset):
        raise ValueError(f"the dataset has {len(dataset)} samples, the run needs {total_samples}")
    for indices in micro_batch_indices(consumed_samples, total_samples, micro_batch_size, dp_rank, dp_size):
        tokens, labels = _collate(dataset, indices, vocab_size)
        yield tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
