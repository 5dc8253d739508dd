"""The pre-LN Transformer block (GPT-2), and the final LayerNorm.

    x = x + dropout(attention(LN_1(x)))
    x = x + dropout(mlp(LN_2(x)))

`checkpoint_activations` recomputes the whole block in backward (parallel/rng.checkpoint), which
replays its dropout masks exactly.
"""
from __future__ import annotations

import torch

from megatron_snm.model.attention import CausalSelfAttention
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.layer_norm import FusedLayerNorm
from megatron_snm.model.mlp import MLP
from megatron_snm.parallel.rng import checkpoint


class TransformerBlock(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        """layer_number counts from 1 (Megatron's convention); it names the block's weights' seeds,
        so a block is the same whichever pipeline stage builds it. `config` is validated by whoever
        assembles the model (model/gpt.py)."""
        super().__init__()
        if not 1 <= layer_number <= config.num_layers:
            raise ValueError(f"layer_number {layer_number} outside 1..{config.num_layers} (--num-layers)")
        self.layer_number = layer_number
        self.checkpoint_activations = config.checkpoint_activations
        h, eps, dtype = config.hidden_size, config.layernorm_epsilon, config.params_dtype
        self.ln_1 = FusedLayerNorm(h, eps=eps, dtype=dtype)
        self.attention = CausalSelfAttention(config, layer_number)
        self.ln_2 = FusedLayerNorm(h, eps=eps, dtype=dtype)
        self.mlp = MLP(config, layer_number)
        self.dropout = torch.nn.Dropout(config.hidden_dropout)

    def _forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.ln_1(x), kv_cache))
        return x + self.dropout(self.mlp(self.ln_2(x)))

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """`kv_cache`: this block's cache when generating (see CausalSelfAttention)."""
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x)
        return self._forward(x, kv_cache)


class FinalLayerNorm(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm = FusedLayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
