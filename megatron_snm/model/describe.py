"""The one place a model describes itself: every weight's layout-free name, full shape, tensor-parallel
split, pipeline layer, tie, and the model's FLOPs per token, read off the model's own modules.

    d = describe(config)                      # a GPTConfig
    d.weights["layers.0.mlp.fc1.weight"]      # WeightInfo(shape=(4h, h), split_dim=0, layer=1, ...)
    d.shapes()                                # {layout-free name: full shape}
    d.parameters(pipeline=2, stage=1)         # on one TP rank of stage 1 (its slices, the tied copy)
    d.flops_per_token()                       # training: forward + backward

How. The layer list of model/gpt.py (`gpt_layers`, the same list GPTModel and the pipeline stages build)
is built on the meta device at TP = 1, which allocates and initialises nothing. A TP = 1 model's
parameter names and shapes are the layout-free form (GPTModel's state dict at TP = 1, PP = 1); each
tensor-parallel parameter records the dimension a larger TP splits (`partition_dim`,
tensor_parallel/layers.py); a layer's position in the list is its DeepSpeed pipeline layer; layers with
the same `tied` key share their TIED_WEIGHT. So a new layer kind, norm, MLP or attention is described
by building it: the consumers (checkpoint read/write/layout, resharding, the pipeline's names, the
ZeRO-3 settings, the memory estimate, the FLOPs, the checkpoint metadata, the Hugging Face mapping's
weight set) change nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import TIED_WEIGHT, gpt_layers
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

PIPELINE_PARTITION = "TransformerBlock"  # DeepSpeed cuts stages by this layer type (pipeline/module.py)


@dataclass(frozen=True)
class WeightInfo:
    name: str                   # layout-free: GPTModel's parameter name at TP = 1
    shape: tuple[int, ...]      # the full tensor's
    split_dim: int | None       # the dimension tensor parallelism splits; None: replicated on every TP rank
    layer: int                  # the pipeline layer (position in gpt_layers) that owns it
    local_name: str             # its name inside that layer
    copies: tuple[int, ...] = ()  # other pipeline layers holding the same weight (a tied output layer)
    matmul: bool = False        # multiplied with every token's activation in the forward pass
    vocabulary: bool = False    # one row per (padded) vocabulary entry: re-padded for another TP size

    @property
    def tied(self) -> bool:
        return bool(self.copies)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def local_shape(self, tensor_parallel: int) -> tuple[int, ...]:
        """The shape of one TP rank's slice."""
        if self.split_dim is None or tensor_parallel == 1:
            return self.shape
        shape = list(self.shape)
        shape[self.split_dim] //= tensor_parallel
        return tuple(shape)

    def local_numel(self, tensor_parallel: int) -> int:
        return math.prod(self.local_shape(tensor_parallel))

    @property
    def module(self) -> str:
        """The layout-free name of the module holding it (what ZeRO-3 gathers together)."""
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class ModelDescription:
    layers: tuple[str, ...]          # the pipeline layers' names (gpt_layers order)
    layer_kinds: tuple[str, ...]     # their classes' names
    weights: dict[str, WeightInfo]   # GPTModel's parameter order
    tensor_parallel_size: int        # the configuration's (per-rank counts default to it)
    attention_flops: float           # forward FLOPs per token of the attention cores (scores and context)

    # --- names and shapes ---------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: w.shape for name, w in self.weights.items()}

    def weight(self, name: str) -> WeightInfo:
        info = self.weights.get(name)
        if info is None:
            raise ValueError(f"weight {name!r} is not one of the model's ({len(self.weights)} weights, e.g. "
                             f"{next(iter(self.weights))})")
        return info

    def split_dim(self, name: str) -> int | None:
        """The dimension along which tensor parallelism splits weight `name`, None if replicated."""
        return self.weight(name).split_dim

    def vocabulary_tables(self) -> list[str]:
        """The weights with one row per (padded) vocabulary entry: the token table, an untied output table."""
        return [w.name for w in self.weights.values() if w.vocabulary]

    @property
    def vocab_rows(self) -> int:
        return self.weights[self.vocabulary_tables()[0]].shape[0]

    # --- pipeline -----------------------------------------------------------------------------
    def pipeline_layer_of(self, name: str) -> tuple[int, str]:
        """(pipeline layer index, name inside that layer) of the file that holds weight `name`."""
        info = self.weight(name)
        return info.layer, info.local_name

    def full_name_of(self, layer: int, local_name: str) -> str:
        """The layout-free name of parameter `local_name` of pipeline layer `layer` (a tied copy's is
        its owner's)."""
        for w in self.weights.values():
            if w.local_name == local_name and (w.layer == layer or layer in w.copies):
                return w.name
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"pipeline layer {layer} is outside 0..{len(self.layers) - 1}")
        raise ValueError(f"pipeline layer {layer} ({self.layers[layer]}) has no weight {local_name!r}")

    def stage_boundaries(self, pipeline: int) -> list[int]:
        """DeepSpeed's cut of the layer list into `pipeline` stages (partition_method
        "type:TransformerBlock": an equal share of blocks): stage s holds layers [parts[s], parts[s+1])."""
        if pipeline == 1:
            return [0, len(self.layers)]
        from deepspeed.runtime.utils import partition_balanced

        return [int(p) for p in partition_balanced([int(kind == PIPELINE_PARTITION) for kind in self.layer_kinds], pipeline)]

    def stage_layers(self, pipeline: int, stage: int) -> range:
        parts = self.stage_boundaries(pipeline)
        return range(parts[stage], parts[stage + 1])

    def stage_weights(self, pipeline: int = 1, stage: int = 0) -> list[WeightInfo]:
        """The weights a rank of `stage` holds (each once; a tied one also where a copy is)."""
        layers = set(self.stage_layers(pipeline, stage))
        return [w for w in self.weights.values() if w.layer in layers or layers.intersection(w.copies)]

    # --- counts -------------------------------------------------------------------------------
    def parameters(self, pipeline: int = 1, stage: int = 0, tensor_parallel: int | None = None) -> int:
        """Parameter elements on one rank of `stage` (its TP slices; a tied copy counted on its stage too)."""
        tp = self.tensor_parallel_size if tensor_parallel is None else tensor_parallel
        return sum(w.local_numel(tp) for w in self.stage_weights(pipeline, stage))

    @property
    def total_parameters(self) -> int:
        """The model's parameters, each weight once."""
        return sum(w.numel for w in self.weights.values())

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward (twice the forward), no recompute: 3 x (2 x the
        matrix weights each token is multiplied with, the output layer's table included, plus the
        attention scores and context). For GPT-2: 6N + 12 L h s."""
        matmul = sum(w.numel for w in self.weights.values() if w.matmul)
        return 3.0 * (2.0 * matmul + self.attention_flops)


def describe(config: GPTConfig) -> ModelDescription:
    """The description of the model `config` builds (validated), its vocabulary padded as for
    config.tensor_parallel_size."""
    config.validate()
    # At TP 1 with the padded vocabulary as the vocabulary: the layout-free form of this layout.
    whole = replace(config, vocab_size=config.padded_vocab_size, tensor_parallel_size=1, sequence_parallel=False,
                    recompute_granularity=None)
    defs = gpt_layers(whole)
    weights: dict[str, WeightInfo] = {}
    owners: dict[str, str] = {}  # tie key -> the layout-free name of the shared weight
    attention = 0.0
    with torch.device("meta"):
        for index, layer in enumerate(defs):
            module = layer.build()
            for module_name, sub in module.named_modules():
                if hasattr(sub, "local_heads") and hasattr(sub, "head_dim"):  # an attention core
                    # QK^T and the context (probabilities x V): 2 x 2 x heads x head_dim x seq per token
                    attention += 4.0 * sub.local_heads * sub.head_dim * config.seq_length
                for param_name, param in sub.named_parameters(recurse=False):
                    local = f"{module_name}.{param_name}" if module_name else param_name
                    output = index == len(defs) - 1 and param.dim() == 2  # the output layer's table
                    matmul = output or (param.dim() == 2 and isinstance(sub, (ColumnParallelLinear, RowParallelLinear)))
                    if layer.tied and local == TIED_WEIGHT and layer.tied in owners:
                        first = weights[owners[layer.tied]]
                        weights[first.name] = replace(first, copies=first.copies + (index,),
                                                      matmul=first.matmul or matmul)
                        continue
                    name = f"{layer.name}.{local}"
                    if layer.tied and local == TIED_WEIGHT:
                        owners[layer.tied] = name
                    weights[name] = WeightInfo(name, tuple(param.shape), getattr(param, "partition_dim", None),
                                               index, local, matmul=matmul,
                                               vocabulary=output or isinstance(sub, VocabParallelEmbedding))
    return ModelDescription(tuple(d.name for d in defs), tuple(d.cls.__name__ for d in defs), weights,
                            config.tensor_parallel_size, attention)
