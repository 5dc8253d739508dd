"""Causal multi-head self-attention, heads split over tensor-parallel ranks.

QKV is one column-parallel projection whose output features are laid out head by head,
[head, (q, k, v), head_dim] (Megatron's layout), so a contiguous slice of it is whole heads: each
TP rank attends with its own heads, and W_O (row-parallel) sums the ranks' contributions.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.init import output_weight_init, weight_init
from megatron_snm.parallel.rng import get_rng_tracker
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.local_heads = config.num_attention_heads // config.tensor_parallel_size
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_dropout
        name = f"layers.{layer_number}.attention"
        self.qkv = ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size,
            init_fn=weight_init(config, f"{name}.qkv"), tp_size=config.tensor_parallel_size,
            params_dtype=config.params_dtype,
        )
        self.dense = RowParallelLinear(  # W_O
            config.hidden_size, config.hidden_size, input_is_parallel=True,
            init_fn=output_weight_init(config, f"{name}.dense"), tp_size=config.tensor_parallel_size,
            params_dtype=config.params_dtype,
        )

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """x [b, s, h]. With `kv_cache` (inference/kv_cache.py) x holds the s tokens after those
        cached: their keys and values are appended, and they attend to all the cached ones."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, local_heads, s, head_dim]
        mask, causal = None, True
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(k, v)
            if past:  # new token i sits at position past + i: it sees keys 0 .. past + i
                causal = False
                mask = None if s == 1 else torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
        dropout_p = self.dropout_p if self.training else 0.0
        # Attention probabilities are split over TP ranks (by head): their dropout must draw from
        # the per-rank stream.
        rng = get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        return self.dense(context.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
