"""Autoregressive generation with a KV cache, on any TP x PP layout.

Every rank of a model replica runs the same loop: the prompt goes through the model once
(filling the caches), then one token at a time. The last pipeline stage picks the next token and
broadcasts it to the replica's ranks, so each rank yields the same tokens as they are produced.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_snm.inference.model import InferenceGPT
from megatron_snm.inference.sampling import SamplingParams, next_token
from megatron_snm.parallel import state


def generate(model: InferenceGPT, prompt: list[int], max_new_tokens: int, params: SamplingParams,
             eod: int | None = None, seed: int = 1234) -> Iterator[int]:
    """Yields up to max_new_tokens new token ids; stops after `eod` (yielded) if given."""
    if not prompt:
        raise ValueError("the prompt is empty (it needs at least one token)")
    limit = model.config.seq_length
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's --seq-length is {limit}, "
                         "which leaves no room for new tokens")
    runtime = model.runtime
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    caches = model.new_caches(1)
    logits = model.forward(torch.tensor([prompt]), caches, 0)
    position = len(prompt)
    for _ in range(min(max_new_tokens, limit - len(prompt))):
        token = torch.zeros(1, dtype=torch.long, device=runtime.device)
        if logits is not None:
            token = next_token(logits[:, -1], params, generator).to(runtime.device)
        if runtime.world_size > 1:
            dist.broadcast(token, src=runtime.last_stage_rank(), group=state.get_model_parallel_group())
        token_id = int(token)
        yield token_id
        if token_id == eod:
            return
        logits = model.forward(token.view(1, 1), caches, position)
        position += 1
