"""Keys and values of the tokens seen so far, per transformer block, so that generating a token
costs one position's work instead of re-running the whole sequence (linear, not quadratic)."""
from __future__ import annotations

import torch


class KVCache:
    """One block's cache: [batch, local key/value heads (query groups), max_length, head_dim] for keys and values,
    allocated once; `append` writes the new positions and returns everything cached so far."""

    def __init__(self, batch: int, heads: int, max_length: int, head_dim: int, dtype: torch.dtype, device):
        self.keys = torch.empty(batch, heads, max_length, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"{end} tokens do not fit the cache of {self.keys.shape[2]} (--seq-length)")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]
