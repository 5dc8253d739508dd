"""Our weights <-> Hugging Face Llama's (`LlamaForCausalLM`), in one table.

A Llama-family model of ours (rotary positions, RMSNorm, SwiGLU, query groups, no biases) is
transformers' Llama with other names and three layouts:
- the fused QKV: ours is [group, (q_1 .. q_r, k, v), head_dim] along the output (model/attention.py,
  r = heads / groups), Llama has q_proj [heads, head_dim], k_proj and v_proj [groups, head_dim];
  query head g r + j uses key/value head g in both (transformers' repeat_kv).
- rotary pairs: ours with --rotary-interleaved rotates (even, odd) channel neighbours, Llama
  (first half, second half) of each head. Reordering each q and k head's channels (evens, then
  odds) turns one into the other exactly: q . k is unchanged by the same reordering of both.
- norm gains: with --apply-layernorm-1p ours stores gain - 1 (model/norm.py); Llama's is the gain.
The embedding has no Llama counterpart beyond the table, but with rotary positions its output is
a function of the token id alone, so Embed LN (norm(E[t])) and Scaled Embed (sqrt(d) E[t]) fold
into the input table exactly; the output layer keeps E, so a tied model of those modes becomes an
untied Llama. Embed Detach changes training's gradients only: its table is E.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import ModelDescription
from megatron_snm.model.norm import build_norm

# (our name, Llama's names, how the tensor changes on the way to Llama). {n} is the layer number
# (from 0). The reverse direction applies each change's inverse.
LAYER_TABLE = (
    ("layers.{n}.ln_1.weight", ("model.layers.{n}.input_layernorm.weight",), "norm"),
    ("layers.{n}.attention.qkv.weight", ("model.layers.{n}.self_attn.q_proj.weight",
                                         "model.layers.{n}.self_attn.k_proj.weight",
                                         "model.layers.{n}.self_attn.v_proj.weight"), "qkv"),
    ("layers.{n}.attention.dense.weight", ("model.layers.{n}.self_attn.o_proj.weight",), "same"),
    ("layers.{n}.ln_2.weight", ("model.layers.{n}.post_attention_layernorm.weight",), "norm"),
    ("layers.{n}.mlp.gate.weight", ("model.layers.{n}.mlp.gate_proj.weight",), "same"),
    ("layers.{n}.mlp.fc1.weight", ("model.layers.{n}.mlp.up_proj.weight",), "same"),
    ("layers.{n}.mlp.fc2.weight", ("model.layers.{n}.mlp.down_proj.weight",), "same"),
)
MODEL_TABLE = (
    ("final_norm.norm.weight", ("model.norm.weight",), "norm"),
    # the tables: the input one folded with the embedding's mode (and Embed LN's gain below), cut to
    # the tokenizer's vocabulary; the output one only where it differs from the input one
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "input_table"),
    ("output.weight", ("lm_head.weight",), "output_table"),
)
EMBEDDING_NORM = "embedding.norm.weight"  # Embed LN's gain: folded into model.embed_tokens
WORD_EMBEDDINGS, OUTPUT = "embedding.word_embeddings.weight", "output.weight"
HF_INPUT_EMBEDDINGS, HF_OUTPUT_LAYER = "model.embed_tokens.weight", "lm_head.weight"


def _table(num_layers: int):
    for n in range(num_layers):
        for ours, theirs, change in LAYER_TABLE:
            yield ours.format(n=n), tuple(t.format(n=n) for t in theirs), change
    yield from MODEL_TABLE


def _interleaved_to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's channels [c0, c1, c2, c3, ...] -> [c0, c2, ..., c1, c3, ...] (rows of a q or k weight)."""
    head_dim = t.shape[0] // heads
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return t.view(heads, head_dim, -1)[:, order].reshape(t.shape)


def _qkv_to_hf(t: torch.Tensor, gpt: GPTConfig) -> tuple[torch.Tensor, ...]:
    groups, head_dim = gpt.num_query_groups, gpt.head_dim
    per_group = gpt.num_attention_heads // groups
    w = t.view(groups, per_group + 2, head_dim, -1)
    q, k, v = (part.reshape(-1, t.shape[-1]) for part in (w[:, :per_group], w[:, per_group], w[:, per_group + 1]))
    if gpt.rotary_interleaved:
        q, k = _interleaved_to_halves(q, gpt.num_attention_heads), _interleaved_to_halves(k, groups)
    return q, k, v


def _qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    hidden = q.shape[-1]
    q = q.view(groups, heads // groups, -1, hidden)
    return torch.cat([q, k.view(groups, 1, -1, hidden), v.view(groups, 1, -1, hidden)], dim=1).reshape(-1, hidden)


def _folded_input_table(weights: dict[str, torch.Tensor], gpt: GPTConfig, vocab_size: int) -> torch.Tensor:
    """What our embedding outputs for each token id (rotary positions: no position term), as a table."""
    words = weights[WORD_EMBEDDINGS][:vocab_size]
    if gpt.embedding_norm == "scaled":
        return words * math.sqrt(gpt.hidden_size)  # the forward pass's multiply, the same fp32 product
    if gpt.embedding_norm == "layernorm":  # the model's own norm (eps, zero-centred gain), in fp32
        norm = build_norm(dataclasses.replace(gpt, params_dtype=torch.float32, sequence_parallel=False))
        norm.load_state_dict({"weight": weights[EMBEDDING_NORM].float()})
        with torch.no_grad():
            return norm(words.float()).to(words.dtype)
    return words  # none, and detach (its forward is E[t])


def to_hf_llama(weights: dict[str, torch.Tensor], model: ModelDescription, gpt: GPTConfig,
                vocab_size: int) -> tuple[dict[str, torch.Tensor], bool]:
    """(Llama's state dict, tie_word_embeddings) from our layout-free weights of `model` (its
    description, model/describe.py: every weight it has is mapped, or refused), the tables cut to
    `vocab_size` rows. lm_head is written where it is not the input table: an untied output table,
    or E under a tied Embed LN / Scaled Embed."""
    table = {ours: (theirs, change) for ours, theirs, change in _table(gpt.num_layers)}
    folded = {EMBEDDING_NORM} if gpt.embedding_norm == "layernorm" else set()
    unmapped = [name for name in model.weights if name not in table and name not in folded]
    if unmapped:
        raise ValueError(f"weights with no Llama counterpart: {unmapped[:4]}; this model cannot be written as Llama")
    out = {}
    for name in model.weights:
        if name not in table:
            continue
        theirs, change = table[name]
        t = weights[name]
        if change == "qkv":
            tensors = _qkv_to_hf(t, gpt)
        elif change == "norm":
            tensors = (t + 1 if gpt.apply_layernorm_1p else t,)
        elif change == "input_table":
            tensors = (_folded_input_table(weights, gpt, vocab_size),)
        elif change == "output_table":
            tensors = (t[:vocab_size],)
        else:
            tensors = (t,)
        out.update((key, tensor.contiguous()) for key, tensor in zip(theirs, tensors))
    tied = OUTPUT not in model.weights and gpt.embedding_norm in ("none", "detach")
    if OUTPUT not in model.weights and not tied:  # the output layer multiplies by E, unfolded
        out[HF_OUTPUT_LAYER] = weights[WORD_EMBEDDINGS][:vocab_size].contiguous()
    return out, tied


def from_hf_llama(hf: dict[str, torch.Tensor], num_layers: int, heads: int, groups: int,
                  tied: bool) -> dict[str, torch.Tensor]:
    """Our layout-free weights (embedding mode `none`, untied unless `tied`) from Llama's state dict.
    Raises ValueError naming the tensors that have no place in ours (biases) or are missing."""
    out, used = {}, set()
    for ours, theirs, change in _table(num_layers):
        if change == "output_table" and tied:
            continue
        missing = [name for name in theirs if name not in hf]
        if missing:
            raise ValueError(f"no tensor {missing[0]}")
        tensors = [hf[name] for name in theirs]
        used.update(theirs)
        out[ours] = (_qkv_from_hf(*tensors, heads, groups) if change == "qkv" else tensors[0]).contiguous()
    extra = sorted(set(hf) - used - ({HF_OUTPUT_LAYER} if tied else set()))
    if extra:
        raise ValueError(f"tensors with no counterpart in our Llama (no biases, no other layers): {extra[:4]}")
    return out
