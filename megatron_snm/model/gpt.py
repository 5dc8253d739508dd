"""The GPT model: embedding -> N pre-norm blocks -> final norm -> vocabulary-parallel output
(tied to the embedding's table, or its own with --untie-embeddings-and-output-weights).

`gpt_layers(config)` describes the model once, as the sequence of its layers (model/describe.py
walks it for every weight's name, shape, split and stage). `GPTModel` builds
all of them in one process (where a tied output layer is the embedding's own table); the pipeline
(pipeline/module.py) builds each stage's share of the same list, the last stage holding only the
tied table (`TiedOutputLayer`) or the untied one. `GPTLoss` is the training loss, whoever computes
it (the engine on GPTModel's logits, the pipeline's last stage); `gpt_loss` its LM part alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.embedding import GPTEmbedding, TiedOutputLayer, UntiedOutputLayer
from megatron_snm.model.transformer import FinalNorm, TransformerBlock, recompute_plan, run_blocks
from megatron_snm.tensor_parallel.cross_entropy import (vocab_parallel_cross_entropy,
                                                         vocab_parallel_cross_entropy_and_log_z)

TIED_EMBEDDING = "embedding"  # the layers that share `word_embeddings.weight`
TIED_WEIGHT = "word_embeddings.weight"  # the weight tied layers share, by its name inside each of them


@dataclass(frozen=True)
class LayerDef:
    name: str  # the prefix of its weights' layout-free names (GPTModel's attribute path)
    cls: type
    args: tuple
    tied: str | None = None  # layers with the same key share their TIED_WEIGHT

    def build(self) -> torch.nn.Module:
        return self.cls(*self.args)


def gpt_layers(config: GPTConfig) -> list[LayerDef]:
    config.validate()
    return [
        LayerDef("embedding", GPTEmbedding, (config,), tied=TIED_EMBEDDING),
        *[LayerDef(f"layers.{n - 1}", TransformerBlock, (config, n)) for n in range(1, config.num_layers + 1)],
        LayerDef("final_norm", FinalNorm, (config,)),
        LayerDef("output", UntiedOutputLayer, (config,)) if config.untie_embeddings_and_output_weights
        else LayerDef("output", TiedOutputLayer, (config,), tied=TIED_EMBEDDING),
    ]


class GPTModel(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        embedding, *blocks, final_norm, output = gpt_layers(config)
        self.embedding = embedding.build()
        self.layers = torch.nn.ModuleList(block.build() for block in blocks)
        alone, self.recompute_chunk = recompute_plan(config, len(self.layers))
        for block, recompute in zip(self.layers, alone):
            block.recompute = recompute
        self.final_norm = final_norm.build()
        # A tied output layer is the embedding's table, which this process holds: it is
        # self.embedding.logits, no second table.
        self.output = None if output.tied else output.build()
        self.loss = GPTLoss(config)  # no parameters; the engine calls it on the logits, the monitor hooks it

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] int64. Without labels: this rank's vocabulary slice of the logits
        [b, s, V_padded / TP]; with labels [b, s]: the per-token fp32 loss [b, s]."""
        hidden = run_blocks(self.layers, self.embedding(tokens), self.recompute_chunk)
        hidden = self.final_norm(hidden)
        logits = self.embedding.logits(hidden) if self.output is None else self.output(hidden)
        return logits if labels is None else vocab_parallel_cross_entropy(logits, labels)


def _masked_mean(values: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    if loss_mask is None:
        return values.mean()
    mask = loss_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def gpt_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross entropy over the tokens where loss_mask is 1 (all tokens without a mask)."""
    return _masked_mean(vocab_parallel_cross_entropy(logits, labels), loss_mask)


class LossTerms(NamedTuple):
    lm: torch.Tensor  # the LM loss: mean cross entropy over the unmasked tokens (what is reported)
    z: torch.Tensor  # --z-loss-weight x the mean of log^2 Z over them (0 without z-loss)
    log_z: torch.Tensor  # per token [b, s], detached: log Z, for observers (the stability monitor)
    loss_mask: torch.Tensor | None  # which tokens count (None: all)


class GPTLoss(torch.nn.Module):
    """The training loss on this rank's vocabulary slice of the logits: the LM loss, and PaLM's z-loss
    (Chowdhery et al. 2022; OLMo-core's z_loss_multiplier) W x mean over tokens of log^2 Z, with Z the
    softmax's normaliser, which pulls log Z towards 0 so the output logits cannot drift upwards together
    (a cause of instability Wortsman et al. 2023 name output-logit divergence). Both come from one
    vocabulary-parallel cross entropy (log Z is its own max and sum of exponentials, correct under TP).
    The one backward pass takes lm + z; the LM loss alone is what is reported and judged for spikes."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.z_loss_weight = config.z_loss_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> LossTerms:
        losses, log_z = vocab_parallel_cross_entropy_and_log_z(logits, labels)
        lm = _masked_mean(losses, loss_mask)
        z = self.z_loss_weight * _masked_mean(log_z.square(), loss_mask) if self.z_loss_weight else lm.new_zeros(())
        return LossTerms(lm, z, log_z.detach(), loss_mask)
