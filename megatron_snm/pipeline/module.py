"""The GPT as a DeepSpeed PipelineModule: model/gpt.py's layer list as layer specs.

    embedding (tied) -> block 1 .. block N -> final LayerNorm -> output layer (tied)

TiedLayerSpec makes the first stage's embedding table and the last stage's output layer one
weight: DeepSpeed broadcasts the first stage's copy at start-up and all-reduces the two copies'
gradients every step (our seeded initialisation makes them equal from the start anyway). Stages
are cut so each gets an equal share of transformer blocks. The topology's axes (pipe, data,
model) are parallel/state.py's rank order, so DeepSpeed's groups and ours agree on every rank's
coordinates.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import PIPELINE_PARTITION, ModelDescription
from megatron_snm.model.gpt import TIED_WEIGHT, GPTLoss, LossTerms, gpt_layers
from megatron_snm.model.transformer import TransformerBlock, recompute_plan
from megatron_snm.parallel.dims import ParallelDims
from megatron_snm.parallel.rng import checkpoint


def _tied_output(module, hidden):
    """The tied output layer, called through a function so that DeepSpeed keeps its weight out of
    the last stage's files: the first stage's embedding file holds the table, and DeepSpeed copies
    it to the last stage after loading (PipelineModule._synchronize_tied_weights)."""
    return module(hidden)


class StageLoss(torch.nn.Module):
    """The last stage's loss: model/gpt.py's GPTLoss on the logits (a submodule of the stage, so the
    stability monitor finds it as in GPTModel), then `reduce(terms) -> the scalar backward takes`."""

    def __init__(self, config: GPTConfig, reduce: Callable[[LossTerms], torch.Tensor]):
        super().__init__()
        self.loss = GPTLoss(config)
        self.reduce = reduce

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.loss(logits, labels))


def gpt_pipeline(config: GPTConfig, loss_fn: Callable[[LossTerms], torch.Tensor], dims: ParallelDims
                 ) -> PipelineModule:
    """Builds this rank's stage of the GPT. Needs parallel/state.py's groups initialised and
    `loss_fn(terms) -> scalar`, the scalar DeepSpeed's backward takes from the loss's terms (StageLoss)."""
    layers = gpt_layers(config)
    # The first layer holding a tied weight owns it; the later ones (the output layer) call it.
    owners = {layer.tied: index for index, layer in reversed(list(enumerate(layers))) if layer.tied}
    specs = [TiedLayerSpec(layer.tied, layer.cls, *layer.args, tied_weight_attr=TIED_WEIGHT,
                           forward_fn=None if owners[layer.tied] == index else _tied_output)
             if layer.tied else LayerSpec(layer.cls, *layer.args) for index, layer in enumerate(layers)]
    topology = PipeModelDataParallelTopology(num_pp=dims.pipeline, num_mp=dims.tensor, num_dp=dims.data)
    # Activation recompute as in GPTModel, per stage: blocks alone by their `recompute`, chunks of
    # consecutive layers by DeepSpeed's interval (counted from the stage's first layer; a chunk
    # holding a layer other than a block, e.g. the embedding, is not recomputed).
    chunk = recompute_plan(config, config.num_layers)[1]
    stage = PipelineModule(specs, loss_fn=StageLoss(config, loss_fn), topology=topology, partition_method=f"type:{PIPELINE_PARTITION}",
                           activation_checkpoint_interval=chunk if chunk > 1 else 0,
                           activation_checkpoint_func=checkpoint, checkpointable_layers=["TransformerBlock"])
    blocks = [layer for layer in stage.forward_funcs if isinstance(layer, TransformerBlock)]
    for block, recompute in zip(blocks, recompute_plan(config, len(blocks))[0]):
        block.recompute = recompute
    return stage


def full_parameter_names(module: torch.nn.Module, model: ModelDescription) -> dict[str, str]:
    """{name in `module`: layout-free name (model/describe.py)} for every parameter of a
    PipelineModule stage (whose names are its layer indices and `tied_modules.*`) or of a GPTModel
    (whose names are the layout-free ones already)."""
    if not isinstance(module, PipelineModule):
        return {name: name for name, _ in module.named_parameters()}
    full_by_id = {}
    for local, layer in enumerate(module.forward_funcs):
        # A tied layer with a forward function is a partial holding the tied module.
        layer = layer.args[0] if isinstance(layer, functools.partial) else layer
        if isinstance(layer, torch.nn.Module):
            for name, param in layer.named_parameters():
                full_by_id.setdefault(id(param), model.full_name_of(module._local_start + local, name))
    return {name: full_by_id[id(param)] for name, param in module.named_parameters()}
