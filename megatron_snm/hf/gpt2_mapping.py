"""Our weights <-> Hugging Face GPT-2's (`GPT2LMHeadModel`), in one table.

Both are the same pre-LN GPT-2; they differ in names and in three layouts:
- GPT-2's linear layers are `Conv1D`s, weight [in, out]: ours (torch Linear, [out, in]) transposed.
- the fused QKV: ours is [head, (q, k, v), head_dim] along the output (model/attention.py), so a
  TP slice is whole heads; GPT-2's c_attn is [(q, k, v), head, head_dim].
- the embedding: with `--embedding-norm scaled` ours multiplies the looked-up rows by sqrt(d) in the
  forward pass and uses the table unscaled as the output layer, so GPT-2 gets wte = sqrt(d) E and an
  untied lm_head = E; an untied output table of ours (--untie-embeddings-and-output-weights) is
  lm_head. With `layernorm` the embedding LayerNorm has no GPT-2 counterpart; it lives in
  our trust_remote_code class (modeling_gpt2_embed_ln.py) as `transformer.drop.norm`.
"""
from __future__ import annotations

import math

import torch

from megatron_snm.model.describe import PIPELINE_PARTITION, ModelDescription

# (our name, GPT-2's name, how the tensor changes on the way to GPT-2). {n} is the layer number
# (from 0). The reverse direction applies each change's inverse.
LAYER_TABLE = (
    ("layers.{n}.ln_1.weight", "transformer.h.{n}.ln_1.weight", "same"),
    ("layers.{n}.ln_1.bias", "transformer.h.{n}.ln_1.bias", "same"),
    ("layers.{n}.attention.qkv.weight", "transformer.h.{n}.attn.c_attn.weight", "qkv_weight"),
    ("layers.{n}.attention.qkv.bias", "transformer.h.{n}.attn.c_attn.bias", "qkv_bias"),
    ("layers.{n}.attention.dense.weight", "transformer.h.{n}.attn.c_proj.weight", "transpose"),
    ("layers.{n}.attention.dense.bias", "transformer.h.{n}.attn.c_proj.bias", "same"),
    ("layers.{n}.ln_2.weight", "transformer.h.{n}.ln_2.weight", "same"),
    ("layers.{n}.ln_2.bias", "transformer.h.{n}.ln_2.bias", "same"),
    ("layers.{n}.mlp.fc1.weight", "transformer.h.{n}.mlp.c_fc.weight", "transpose"),
    ("layers.{n}.mlp.fc1.bias", "transformer.h.{n}.mlp.c_fc.bias", "same"),
    ("layers.{n}.mlp.fc2.weight", "transformer.h.{n}.mlp.c_proj.weight", "transpose"),
    ("layers.{n}.mlp.fc2.bias", "transformer.h.{n}.mlp.c_proj.bias", "same"),
)
MODEL_TABLE = (
    ("embedding.position_embeddings", "transformer.wpe.weight", "same"),
    ("embedding.norm.weight", "transformer.drop.norm.weight", "same"),  # layernorm mode only
    ("embedding.norm.bias", "transformer.drop.norm.bias", "same"),
    ("final_norm.norm.weight", "transformer.ln_f.weight", "same"),
    ("final_norm.norm.bias", "transformer.ln_f.bias", "same"),
)
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
HF_INPUT_EMBEDDINGS, HF_OUTPUT_LAYER = "transformer.wte.weight", "lm_head.weight"


def _qkv_to_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[head, (q,k,v), head_dim, ...] -> [(q,k,v), head, head_dim, ...] along dim 0."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_from_hf(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _to_hf(change: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    if change == "same":
        return t
    if change == "transpose":
        return t.t()
    if change == "qkv_weight":
        return _qkv_to_hf(t, heads).t()
    if change == "qkv_bias":
        return _qkv_to_hf(t, heads)
    raise ValueError(change)


def _from_hf(change: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    if change == "same":
        return t
    if change == "transpose":
        return t.t()
    if change == "qkv_weight":
        return _qkv_from_hf(t.t(), heads)
    if change == "qkv_bias":
        return _qkv_from_hf(t, heads)
    raise ValueError(change)


def _table(num_layers: int):
    for n in range(num_layers):
        for ours, theirs, change in LAYER_TABLE:
            yield ours.format(n=n), theirs.format(n=n), change
    yield from MODEL_TABLE


def to_hf_gpt2(weights: dict[str, torch.Tensor], model: ModelDescription, num_heads: int, hidden_size: int,
               embedding_norm: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """GPT-2's state dict from our layout-free weights of `model` (its description, model/describe.py:
    every weight it has is mapped, or refused), the tables cut to `vocab_size` rows. An untied output
    table (--untie-embeddings-and-output-weights) becomes lm_head."""
    num_layers = sum(kind == PIPELINE_PARTITION for kind in model.layer_kinds)
    table = {ours: (theirs, change) for ours, theirs, change in _table(num_layers)}
    output_tables = [name for name in model.vocabulary_tables() if name != WORD_EMBEDDINGS]
    unmapped = [name for name in model.weights if name not in table and name != WORD_EMBEDDINGS
                and name not in output_tables]
    if unmapped or len(output_tables) > 1:
        raise ValueError(f"weights with no GPT-2 counterpart: {(unmapped or output_tables)[:4]}; this model "
                         "cannot be written as GPT-2")
    out = {}
    for name in model.weights:
        if name in table:
            theirs, change = table[name]
            out[theirs] = _to_hf(change, weights[name], num_heads).contiguous()
    words = weights[WORD_EMBEDDINGS][:vocab_size]
    # scaled: ours multiplies the looked-up rows by sqrt(d) in the forward pass only
    out[HF_INPUT_EMBEDDINGS] = (words * math.sqrt(hidden_size) if embedding_norm == "scaled" else words).contiguous()
    if output_tables:
        out[HF_OUTPUT_LAYER] = weights[output_tables[0]][:vocab_size].contiguous()
    elif embedding_norm == "scaled":
        out[HF_OUTPUT_LAYER] = words.contiguous()
    # else: none, detach (a training-time change only) and layernorm with a tied table: wte alone
    return out


def from_hf_gpt2(hf: dict[str, torch.Tensor], num_layers: int, num_heads: int) -> dict[str, torch.Tensor]:
    """Our layout-free weights (embedding mode `none`) from a GPT-2 state dict with a tied lm_head."""
    out = {}
    for ours, theirs, change in _table(num_layers):
        if theirs in hf:
            out[ours] = _from_hf(change, hf[theirs], num_heads).contiguous()
    out[WORD_EMBEDDINGS] = hf[HF_INPUT_EMBEDDINGS].contiguous()
    return out
