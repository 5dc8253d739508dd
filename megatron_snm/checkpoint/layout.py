"""Where each of the GPT's weights lives in a parallel layout, and how to cut and join them.

The layout-free ("full") form of a model is GPTModel's state dict at TP = 1, PP = 1: names such as
`embedding.word_embeddings.weight`, `layers.0.attention.qkv.weight` (layers counted from 0),
`final_norm.norm.bias`, each tensor whole. Everything here converts between that form and one
rank's piece of it:

- tensor parallelism splits a weight along one dimension (TP_SPLIT_DIM below; replicated weights
  are absent from it). The fused QKV is laid out [head, (q, k, v), head_dim] (model/attention.py),
  so a contiguous slice of its rows is whole heads, and a plain split along dim 0 is right.
- pipeline parallelism gives each stage whole DeepSpeed "layers": layer 0 is the embedding,
  layers 1..N the transformer blocks, N + 1 the final LayerNorm (N + 2, the tied output layer,
  reuses layer 0's weights and has no file of its own). `pipeline_layer_of` maps a full name to
  (layer index, name inside that layer).
- the vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP (model/config.py),
  so a layout's table has `padded_vocab_size(vocab, tp)` rows; `resize_rows` / `resize_vocabulary`
  trim or add padding rows for another layout.
"""
from __future__ import annotations

import re

import torch

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
# Parameter-name suffix -> the dimension tensor parallelism splits. Names not matched are
# replicated on every TP rank (LayerNorms, position embeddings, the row-parallel biases).
TP_SPLIT_DIM = {
    WORD_EMBEDDINGS: 0,            # VocabParallelEmbedding: vocabulary rows
    "attention.qkv.weight": 0,     # ColumnParallelLinear: output rows, whole heads
    "attention.qkv.bias": 0,
    "attention.dense.weight": 1,   # RowParallelLinear: input columns
    "mlp.fc1.weight": 0,           # ColumnParallelLinear
    "mlp.fc1.bias": 0,
    "mlp.fc2.weight": 1,           # RowParallelLinear
    "output.weight": 0,            # --untie-embeddings-and-output-weights: vocabulary rows
}

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def tp_split_dim(name: str) -> int | None:
    """The dimension along which tensor parallelism splits weight `name`, None if replicated."""
    for suffix, dim in TP_SPLIT_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    return None


def tensor_parallel_slice(name: str, tensor: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """TP rank `tp_rank`'s slice of full weight `name` (the whole tensor if replicated)."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return tensor
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{name}: dimension {dim} ({tensor.shape[dim]}) is not divisible by TP size {tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].clone()


def split_for_tensor_parallel(full: dict[str, torch.Tensor], tp_size: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank `tp_rank`'s slice of every weight (the vocabulary must already be padded for tp_size)."""
    return {name: tensor_parallel_slice(name, tensor, tp_size, tp_rank) for name, tensor in full.items()}


def check_same_names(pieces: list, where: str) -> None:
    """Refuses TP ranks' pieces (mappings by name) that do not name the same weights as rank 0's."""
    for rank, piece in enumerate(pieces[1:], 1):
        if piece.keys() != pieces[0].keys():
            raise ValueError(f"{where}: TP rank {rank} holds other weights than rank 0: "
                             f"{sorted(piece.keys() ^ pieces[0].keys())[:5]}")


def join_slices(name: str, slices: list[torch.Tensor]) -> torch.Tensor:
    """Full weight `name` from every TP rank's slice of it (in rank order); a replicated one is rank 0's."""
    dim = tp_split_dim(name)
    return slices[0] if dim is None or len(slices) == 1 else torch.cat(slices, dim=dim)


def join_tensor_parallel(pieces: list[dict[str, torch.Tensor]], where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The full weights from every TP rank's slices (in rank order)."""
    check_same_names(pieces, where)
    return {name: join_slices(name, [piece[name] for piece in pieces]) for name in pieces[0]}


def pipeline_layer_of(name: str, num_layers: int) -> tuple[int, str]:
    """(DeepSpeed pipeline layer index, name inside that layer) of full weight `name`."""
    if name.startswith("embedding."):
        return 0, name[len("embedding."):]
    if name.startswith("final_norm."):
        return num_layers + 1, name[len("final_norm."):]
    match = _LAYER.fullmatch(name)
    if match is None:
        raise ValueError(f"weight {name!r} belongs to no pipeline layer")
    return int(match.group(1)) + 1, match.group(2)


def full_name_of(layer: int, name: str, num_layers: int) -> str:
    """The inverse of pipeline_layer_of; also names the output layer's weight (layer N + 2: the
    tied table is the embedding's, an untied one `output.weight`)."""
    if layer == 0:
        return "embedding." + name
    if layer == num_layers + 1:
        return "final_norm." + name
    if layer == num_layers + 2:
        return WORD_EMBEDDINGS if name == "word_embeddings.weight" else "output." + name
    if 1 <= layer <= num_layers:
        return f"layers.{layer - 1}.{name}"
    raise ValueError(f"pipeline layer {layer} is outside 0..{num_layers + 2}")


def pipeline_stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """The transformer blocks (counted from 0) that pipeline stage `stage` holds, as DeepSpeed's
    `partition_method="type:TransformerBlock"` cuts them (an equal share, the remainder spread
    over the last stages)."""
    from deepspeed.runtime.utils import partition_balanced

    parts = partition_balanced([1] * num_layers, pp_size)
    return range(parts[stage], parts[stage + 1])


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


def resize_vocabulary(full: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """The weights with the embedding table cut or padded to `rows` rows (resize_rows)."""
    return dict(full, **{WORD_EMBEDDINGS: resize_rows(full[WORD_EMBEDDINGS], rows)})
