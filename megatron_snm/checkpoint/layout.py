"""Where each of the GPT's weights lives in a parallel layout, and how to cut and join them.

The layout-free ("full") form of a model is GPTModel's state dict at TP = 1, PP = 1: names such as
`embedding.word_embeddings.weight`, `layers.0.attention.qkv.weight` (layers counted from 0),
`final_norm.norm.bias`, each tensor whole. Everything here converts between that form and one
rank's piece of it:

- tensor parallelism splits a weight along one dimension, the one its layer splits (the model's
  description, model/describe.py, says which; replicated weights have none). The fused QKV is laid
  out [head, (q, k, v), head_dim] (model/attention.py), so a contiguous slice of its rows is whole
  heads, and a plain split along dim 0 is right.
- pipeline parallelism gives each stage whole DeepSpeed "layers", the positions in model/gpt.py's
  layer list (the embedding, the blocks, the final LayerNorm, the output layer; a tied output layer
  reuses the embedding's table and has no file of its own): the description's `pipeline_layer_of`
  and `full_name_of` map between a full name and (layer index, name inside that layer).
- the vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP (model/config.py),
  so a layout's table has `padded_vocab_size(vocab, tp)` rows; `resize_rows` / `resize_vocabulary`
  trim or add padding rows for another layout.
"""
from __future__ import annotations

import torch

from megatron_snm.model.describe import ModelDescription

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"  # the token table of every GPT (model/gpt.py)


def tensor_parallel_slice(model: ModelDescription, name: str, tensor: torch.Tensor, tp_size: int,
                          tp_rank: int) -> torch.Tensor:
    """TP rank `tp_rank`'s slice of full weight `name` (the whole tensor if replicated)."""
    dim = model.split_dim(name)
    if dim is None or tp_size == 1:
        return tensor
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{name}: dimension {dim} ({tensor.shape[dim]}) is not divisible by TP size {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].clone()


def split_for_tensor_parallel(model: ModelDescription, full: dict[str, torch.Tensor], tp_size: int,
                              tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s slice of every weight (the vocabulary must already be padded for tp_size)."""
    return {name: tensor_parallel_slice(model, name, tensor, tp_size, tp_rank) for name, tensor in full.items()}


def check_same_names(pieces: list, where: str) -> None:
    """Refuses TP ranks' pieces (mappings by name) that do not name the same weights as rank 0's."""
    for rank, piece in enumerate(pieces[1:], 1):
        if piece.keys() != pieces[0].keys():
            raise ValueError(f"{where}: TP rank {rank} holds other weights than rank 0: "
                             f"{sorted(piece.keys() ^ pieces[0].keys())[:5]}")


def join_slices(model: ModelDescription, name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """Full weight `name` from every TP rank's slice of it (in rank order); a replicated one is rank 0's."""
    dim = model.split_dim(name)
    return slices[0] if dim is None or len(slices) == 1 else torch.cat(slices, dim=dim)


def join_tensor_parallel(model: ModelDescription, pieces: list[dict[str, torch.Tensor]],
                         where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The full weights from every TP rank's slices (in rank order)."""
    check_same_names(pieces, where)
    unknown = sorted(set(pieces[0]) - set(model.weights))
    if unknown:
        raise ValueError(f"{where}: weights the model in its metadata does not have: {unknown[:4]}")
    return {name: join_slices(model, name, [piece[name] for piece in pieces]) for name in pieces[0]}


def resize_rows(table: torch.Tensor, rows: int, fill: str = "mean") -> torch.Tensor:
    """A vocabulary table cut or padded to `rows` rows. Only padding rows (ids past the tokenizer's
    vocabulary, which no text contains) are ever removed or added. Added rows are the mean of the
    existing rows (`fill="mean"`): their logit is then the average logit, so together they take
    about (added / vocabulary) of the probability mass instead of dominating it, as zero rows
    (logit 0) would for a model whose logits are negative. `fill="zero"`: for Adam's moments of
    rows never trained."""
    if table.shape[0] == rows:
        return table
    if table.shape[0] > rows:
        return table[:rows].clone()
    extra = table.float().mean(dim=0, keepdim=True).to(table.dtype) if fill == "mean" else table.new_zeros(1, table.shape[1])
    return torch.cat([table, extra.expand(rows - table.shape[0], -1)])


def resize_vocabulary(model: ModelDescription, full: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The weights with every vocabulary table (the token table, an untied output table) cut or
    padded to `rows` rows (resize_rows)."""
    return dict(full, **{name: resize_rows(full[name], rows) for name in model.vocabulary_tables()})
