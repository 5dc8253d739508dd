"""A checkpoint's GPT for evaluation and generation, on one process or split over TP x PP x DP
ranks started by any of the training launchers (deepspeed, torchrun, mpirun).

    runtime = start_runtime(tensor_parallel, pipeline_parallel)     # groups, device
    model = InferenceGPT(read_checkpoint(path), vocab_size, runtime)
    logits = model.forward(tokens)            # [b, s, vocab] fp32 on the last pipeline stage, else None

Each rank builds only its own part: its TP slice of every weight (from the layout-free weights,
so any checkpoint layout serves any inference layout) and the transformer blocks of its pipeline
stage; hidden states travel stage to stage by send/recv. Logits are gathered over TP and cut to the
tokenizer's vocabulary (the padding rows are no tokens), as in the exported Hugging Face model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from megatron_snm.checkpoint.layout import resize_vocabulary, split_for_tensor_parallel
from megatron_snm.checkpoint.read import FullCheckpoint
from megatron_snm.inference.kv_cache import KVCache
from megatron_snm.model.describe import describe
from megatron_snm.model.gpt import gpt_layers
from megatron_snm.parallel import distributed, state
from megatron_snm.parallel.dims import ParallelDims
from megatron_snm.parallel.mappings import gather_from_tensor_model_parallel_region
from megatron_snm.training.deepspeed_adapter import init_distributed


@dataclass(frozen=True)
class Runtime:
    world_size: int
    rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return state.get_pipeline_model_parallel_rank() == 0

    @property
    def is_last_stage(self) -> bool:
        return state.get_pipeline_model_parallel_rank() == state.get_pipeline_model_parallel_world_size() - 1

    def last_stage_rank(self) -> int:
        """Global rank of TP rank 0 on the last pipeline stage of this rank's model replica."""
        if self.world_size == 1:
            return 0
        return state.rank_of(0, state.get_data_parallel_rank(), state.get_pipeline_model_parallel_world_size() - 1,
                             state.get_tensor_model_parallel_world_size(), state.get_data_parallel_world_size())


def start_runtime(tensor_parallel: int, pipeline_parallel: int) -> Runtime:
    """Joins the launcher's processes (none to join when run alone) and makes the TP/PP/DP groups.
    Raises ValueError if the world does not divide into the layout."""
    env = distributed.discover()
    ParallelDims.of_world(env.world_size, tensor_parallel, pipeline_parallel)
    if env.world_size > 1:
        init_distributed(env)
        state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    return Runtime(env.world_size, env.rank, distributed.device())


def stop_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()
        state.destroy_model_parallel()
        dist.destroy_process_group()


class InferenceGPT:
    def __init__(self, ckpt: FullCheckpoint, vocab_size: int, runtime: Runtime, dtype: torch.dtype | None = None):
        self.runtime, self.vocab_size = runtime, vocab_size
        tp, tp_rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
        config = replace(ckpt.gpt_config(vocab_size), hidden_dropout=0.0, attention_dropout=0.0, tensor_parallel_size=tp)
        self.config = config
        pp, stage = state.get_pipeline_model_parallel_world_size(), state.get_pipeline_model_parallel_rank()
        model = describe(config)
        local = split_for_tensor_parallel(model, resize_vocabulary(model, ckpt.weights, config.padded_vocab_size),
                                          tp, tp_rank)
        dtype = dtype or config.params_dtype

        def build(index: int, layer) -> torch.nn.Module:
            """Pipeline layer `index` of the model, with its weights (a tied layer's are its owner's)."""
            with torch.device("meta"):
                module = layer.build()
            weights = {name: local[model.full_name_of(index, name)] for name, _ in module.named_parameters()}
            module.load_state_dict(weights, assign=True)
            return module.to(device=runtime.device, dtype=dtype).eval()

        # This stage's share of the layer list, as the pipeline cuts it (model/gpt.py, model/describe.py):
        # the first stage's embedding, its blocks, the last stage's final norm and output layer.
        layers = gpt_layers(config)
        mine = model.stage_layers(pp, stage)
        first, last = 0, len(layers) - 1
        self.embedding = build(first, layers[first]) if first in mine else None
        self.blocks = [build(i, layers[i]) for i in mine if i not in (first, last - 1, last)]
        self.final_norm = build(last - 1, layers[last - 1]) if last - 1 in mine else None
        self.output = build(last, layers[last]) if last in mine else None
        self.dtype = dtype

    def new_caches(self, batch: int) -> list[KVCache]:
        # Keys and values exist per query group (grouped-query attention shares them among the group's heads).
        groups = self.config.num_query_groups // state.get_tensor_model_parallel_world_size()
        return [KVCache(batch, groups, self.config.seq_length, self.config.head_dim, self.dtype, self.runtime.device)
                for _ in self.blocks]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None, position_offset: int = 0):
        """tokens [b, s] (the same on every rank of the replica) -> logits [b, s, vocab] fp32 on the
        last pipeline stage, None on the others. With caches: tokens follow the cached ones."""
        b, s = tokens.shape
        ranks = state.get_pipeline_model_parallel_ranks() if self.runtime.world_size > 1 else [0]
        stage = state.get_pipeline_model_parallel_rank()
        if self.runtime.is_first_stage:
            hidden = self.embedding(tokens.to(self.runtime.device), position_offset)
        else:
            hidden = torch.empty(b, s, self.config.hidden_size, dtype=self.dtype, device=self.runtime.device)
            dist.recv(hidden, src=ranks[stage - 1])
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, caches[i] if caches is not None else None)
        if not self.runtime.is_last_stage:
            dist.send(hidden.contiguous(), dst=ranks[stage + 1])
            return None
        logits = gather_from_tensor_model_parallel_region(self.output(self.final_norm(hidden)))
        return logits[..., :self.vocab_size].float()
