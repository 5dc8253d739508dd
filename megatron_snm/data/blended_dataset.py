"""Several datasets drawn in fixed proportions (`--data-path 0.3 A 0.7 B`).

Sample i comes from the dataset whose count so far is furthest below weight * i (Megatron's
greedy rule): no randomness, so every rank and every restart sees the same blend, and every
prefix of the blend is as close to the weights as whole samples allow.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from megatron_snm.data.errors import DataError
from megatron_snm.data.helpers import build_blending_indices


class BlendedDataset(torch.utils.data.Dataset):
    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendedDataset: {len(datasets)} datasets but {len(weights)} weights")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"BlendedDataset: weights must be positive numbers, got {list(weights)}")
        if size < 1:
            raise ValueError(f"BlendedDataset: size must be >= 1, got {size}")
        self.datasets = list(datasets)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self._build_indices()
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for k, (count, dataset) in enumerate(zip(counts, self.datasets)):
            if count > len(dataset):
                name = repr(dataset) if len(repr(dataset)) < 200 else f"{type(dataset).__name__} of {len(dataset)}"
                raise DataError(
                    f"BlendedDataset: the blend draws {count} samples from dataset {k} ({name}), "
                    f"which has only {len(dataset)}"
                )

    def _build_indices(self):
        # dataset_index[i]: which dataset serves sample i; dataset_sample_index[i]: which of its samples.
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            np.asarray(self.weights, dtype=np.float64), self.size
        )

    def __len__(self) -> int:
        return self.size

    def sample_origin(self, idx: int) -> str:
        """Where sample `idx` comes from, for error messages: the dataset that serves it."""
        inner = self.datasets[self.dataset_index[idx]]
        inner_idx = int(self.dataset_sample_index[idx])
        origin = inner.sample_origin(inner_idx) if hasattr(inner, "sample_origin") else f"{inner!r} sample {inner_idx}"
        return f"{origin}, blend sample {idx}"

    def __getitem__(self, idx: int) -> dict:
        if not -self.size <= idx < self.size:
            raise IndexError(f"BlendedDataset: sample {idx} out of range for {self.size} samples")
        return self.datasets[self.dataset_index[idx]][int(self.dataset_sample_index[idx])]

    def describe(self, idx: int) -> dict:
        """Where sample `idx` comes from (see GPTDataset.describe)."""
        return self.datasets[self.dataset_index[idx]].describe(int(self.dataset_sample_index[idx]))

    # The indices are cheap to rebuild and deterministic: DataLoader workers rebuild rather than
    # receive them pickled.
    def __getstate__(self):
        state = dict(self.__dict__)
        del state["dataset_index"], state["dataset_sample_index"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_indices()
