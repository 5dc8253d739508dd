"""Rotary position embeddings (Su et al., RoFormer), as Megatron-LM applies them
(`--position-embedding-type rope`, `--rotary-base`, `--rotary-percent`, `--rotary-interleaved`).

Each head's first `rotary_dim` channels of the queries and keys are rotated by an angle that grows
with the token's position p: channel pair i turns by p * base^(-2i / rotary_dim). The remaining
channels pass unchanged. Pairs are (first half, second half) of the rotated channels by default
(Llama's and GPT-NeoX's layout, what Hugging Face's Llama does), or (even, odd) neighbours with
`--rotary-interleaved` (RoFormer's). Positions enter attention only through q . k, which then
depends on the distance between the two tokens alone; the embedding block carries no position
table, so its output is a function of the token id.
"""
from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, rotary_dim: int, base: int = 10000, interleaved: bool = False):
        super().__init__()
        self.rotary_dim, self.interleaved = rotary_dim, interleaved
        # Not a parameter nor a buffer: a function of the flags, so never in a checkpoint. Made on the CPU
        # whatever the default device: a block built on the meta device (inference builds its layers there,
        # then assigns the checkpoint's weights) would otherwise have no frequencies to rotate with.
        self.inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim))

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [s, rotary_dim] (fp32) for integer positions [s]."""
        if self.inv_freq.device != positions.device:  # once: module.to() does not move a plain attribute
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = torch.outer(positions.to(torch.float64), self.inv_freq)
        freqs = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([freqs, freqs], dim=-1)
        return freqs.cos().float(), freqs.sin().float()

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The quarter turn of each channel pair: (a, b) -> (-b, a)."""
        if self.interleaved:
            even, odd = x[..., 0::2], x[..., 1::2]
            return torch.stack([-odd, even], dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)

    def forward(self, x: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        """x [b, heads, s, head_dim] at positions offset .. offset + s - 1 -> rotated, same dtype."""
        s = x.shape[2]
        cos, sin = self.angles(torch.arange(position_offset, position_offset + s, device=x.device))
        rotated, passed = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        out = rotated.float() * cos + self._rotate(rotated.float()) * sin
        return torch.cat([out.to(x.dtype), passed], dim=-1) if passed.shape[-1] else out.to(x.dtype)
