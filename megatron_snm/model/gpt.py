"""The GPT model: embedding -> N pre-LN blocks -> final LayerNorm -> tied, vocabulary-parallel output.

GPTModel is only those pieces in sequence; the pieces are separate modules so the training side
can cut the model into pipeline stages (the embedding is built again on the last stage for the
tied output layer; seeded initialisation makes both copies equal).
"""
from __future__ import annotations

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.embedding import GPTEmbedding
from megatron_snm.model.transformer import FinalLayerNorm, TransformerBlock
from megatron_snm.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy


class GPTModel(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embedding = GPTEmbedding(config)
        self.layers = torch.nn.ModuleList(TransformerBlock(config, n) for n in range(1, config.num_layers + 1))
        self.final_norm = FinalLayerNorm(config)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] int64. Without labels: this rank's vocabulary slice of the logits
        [b, s, V_padded / TP]; with labels [b, s]: the per-token fp32 loss [b, s]."""
        hidden = self.embedding(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.embedding.logits(self.final_norm(hidden))
        return logits if labels is None else vocab_parallel_cross_entropy(logits, labels)


def gpt_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the tokens where loss_mask is 1 (all tokens without a mask)."""
    losses = vocab_parallel_cross_entropy(logits, labels)
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
