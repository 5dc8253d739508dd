"""The pre-norm Transformer block, and the final norm.

    x = x + dropout(attention(norm_1(x)))
    x = x + dropout(mlp(norm_2(x)))

The parts come from the seams: the norm from model/norm.py (LayerNorm or RMSNorm), the MLP from
model/mlp.py (GELU or SwiGLU), attention with its query groups and position scheme from
model/attention.py. GPT-2 and Llama-family blocks differ only in those choices.

Activation recompute (parallel/rng.checkpoint, which replays the dropout masks exactly):
`--recompute-granularity full` recomputes whole blocks, either a block alone (`recompute` set on it:
--recompute-method block, or uniform chunks of one block) or a chunk of consecutive blocks as one
(`recompute_chunks`, --recompute-method uniform with --recompute-num-layers > 1); `selective`
recomputes attention's core only (model/attention.py).

With --sequence-parallel, x is this TP rank's shard of the sequence [b, s / TP, h]: the LayerNorms,
the residual adds and the dropout run on the shard (dropout drawing from the TP-rank stream, as the
shards differ), and the attention and MLP layers gather and reduce-scatter around themselves.
"""
from __future__ import annotations

import torch

from megatron_snm.model.attention import CausalSelfAttention
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.mlp import build_mlp
from megatron_snm.model.norm import build_norm
from megatron_snm.parallel import rng
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
        # Whether this block is recomputed on its own; GPTModel / the pipeline set it from the plan
        # (recompute_plan), since "the first N blocks of the stage" depends on the stage.
        self.recompute = False
        self.sequence_parallel = config.sequence_parallel
        self.ln_1 = build_norm(config)
        self.attention = CausalSelfAttention(config, layer_number)
        self.ln_2 = build_norm(config)
        self.mlp = build_mlp(config, layer_number)
        self.dropout = torch.nn.Dropout(config.hidden_dropout)

    def _forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = x + rng.dropout(self.dropout, self.attention(self.ln_1(x), kv_cache), split=self.sequence_parallel)
        return x + rng.dropout(self.dropout, self.mlp(self.ln_2(x)), split=self.sequence_parallel)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """`kv_cache`: this block's cache when generating (see CausalSelfAttention)."""
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x)
        return self._forward(x, kv_cache)


def recompute_plan(config: GPTConfig, blocks: int) -> tuple[list[bool], int]:
    """For a stage of `blocks` consecutive blocks: which blocks are recomputed one by one, and the
    size of the chunks recomputed as one (1: none). Megatron's plan: uniform -> chunks of
    --recompute-num-layers; block -> the stage's first --recompute-num-layers blocks."""
    alone = [False] * blocks
    if config.recompute_granularity != "full":
        return alone, 1
    if config.recompute_method == "block":
        return [n < config.recompute_num_layers for n in range(blocks)], 1
    if config.recompute_num_layers == 1:
        return [True] * blocks, 1
    return alone, config.recompute_num_layers


def run_blocks(blocks, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """The blocks in order; in training with chunk > 1, each `chunk` consecutive blocks are
    recomputed as one in the backward pass (only the chunk's input is kept)."""
    if chunk == 1 or not (blocks and blocks[0].training and torch.is_grad_enabled()):
        for block in blocks:
            hidden = block(hidden)
        return hidden

    def chunk_forward(chunk_blocks):
        def forward(x):
            for block in chunk_blocks:
                x = block(x)
            return x
        return forward

    for first in range(0, len(blocks), chunk):
        hidden = checkpoint(chunk_forward(blocks[first:first + chunk]), hidden)
    return hidden


class FinalNorm(torch.nn.Module):
    """The norm after the last block (its own layer, so a pipeline's last stage can hold it)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm = build_norm(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
