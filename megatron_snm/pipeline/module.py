"""The GPT as a DeepSpeed PipelineModule: the model's own pieces as layer specs.

    embedding (tied) -> block 1 .. block N -> final LayerNorm -> embedding.logits (tied)

The embedding appears on the first stage (token lookup) and again on the last (the output layer);
TiedLayerSpec makes the two copies one weight: DeepSpeed broadcasts the first stage's copy at
start-up and all-reduces the two copies' gradients every step. Stages are cut so each gets an
equal share of transformer blocks. The topology's axes (pipe, data, model) are parallel/state.py's
rank order, so DeepSpeed's groups and ours agree on every rank's coordinates.
"""
from __future__ import annotations

from typing import Callable

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.embedding import GPTEmbedding
from megatron_snm.model.transformer import FinalLayerNorm, TransformerBlock

TIED_EMBEDDING = "embedding"


def _output_layer(embedding: GPTEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)


def gpt_pipeline(config: GPTConfig, loss_fn: Callable, tensor: int, pipeline: int, data: int) -> PipelineModule:
    """Builds this rank's stage of the GPT. Needs parallel/state.py's groups initialised (the
    blocks read the TP size) and `loss_fn(logits, labels) -> scalar`."""
    specs = [
        TiedLayerSpec(TIED_EMBEDDING, GPTEmbedding, config, tied_weight_attr="word_embeddings.weight"),
        *[LayerSpec(TransformerBlock, config, n) for n in range(1, config.num_layers + 1)],
        LayerSpec(FinalLayerNorm, config),
        TiedLayerSpec(TIED_EMBEDDING, GPTEmbedding, config, forward_fn=_output_layer,
                      tied_weight_attr="word_embeddings.weight"),
    ]
    topology = PipeModelDataParallelTopology(num_pp=pipeline, num_mp=tensor, num_dp=data)
    return PipelineModule(specs, loss_fn=loss_fn, topology=topology, partition_method="type:TransformerBlock")
