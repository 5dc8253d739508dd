"""Micro-batches for each data-parallel rank, resumable at the exact sample.

The training set is read in order from `consumed_samples` (Megatron's pretraining sampler): each
global batch is the next `global_batch_size` sample indices, cut into micro-batches of
`micro_batch_size` per DP rank. A checkpoint's consumed-samples count therefore restores the data
position exactly, whatever the launcher; the datasets themselves are already shuffled by seed.
With --num-workers N, N DataLoader worker processes read and collate the micro-batches ahead of the
step, in the same order. With `vocab_size` every micro-batch's token ids are checked against the
tokenizer's vocabulary (an id the model cannot represent raises DataError naming the sample).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from megatron_snm.data.vocabulary_check import check_token_ids


def _collate(dataset, indices: list[int], vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.from_numpy(np.stack([np.asarray(dataset[i]["text"], dtype=np.int64) for i in indices]))
    if vocab_size is not None:
        check_token_ids(text, vocab_size, dataset, indices)
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()  # tokens, labels


class MicroBatches(torch.utils.data.Dataset):
    """This DP rank's micro-batches as a map-style dataset: item k is the k-th (tokens, labels) from
    `consumed_samples` on (computed, not listed: a long run has millions)."""

    def __init__(self, dataset, consumed_samples: int, total_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, vocab_size: int | None = None):
        self.dataset, self.consumed, self.micro_batch_size, self.dp_rank = dataset, consumed_samples, \
            micro_batch_size, dp_rank
        self.vocab_size = vocab_size
        self.step = micro_batch_size * dp_size
        self.count = max(0, (total_samples - consumed_samples) // self.step)

    def __len__(self) -> int:
        return self.count

    def indices(self, k: int) -> list[int]:
        first = self.consumed + k * self.step + self.dp_rank * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _collate(self.dataset, self.indices(k), self.vocab_size)


def micro_batches(dataset, consumed_samples: int, total_samples: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, device: torch.device,
                  vocab_size: int | None = None, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens [m, s], labels [m, s]) for this DP rank. `total_samples` may exceed len(dataset)
    only if the dataset wraps around itself (GPTDataset builds exactly what it is asked for)."""
    if total_samples > len(dataset):
        raise ValueError(f"the dataset has {len(dataset)} samples, the run needs {total_samples}")
    batches = MicroBatches(dataset, consumed_samples, total_samples, micro_batch_size, dp_rank, dp_size, vocab_size)
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
    else:
        loader = (batches[k] for k in range(len(batches)))
    for tokens, labels in loader:
        yield tokens.to(device, non_blocking=True), labels.to(device, non_blocking=True)
