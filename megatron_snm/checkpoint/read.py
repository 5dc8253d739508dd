"""Reads a checkpoint of any layout into one layout-free state dict plus the run's configuration.

    ckpt = read_checkpoint("runs/tiny-cpu/checkpoints")      # its `latest`, or tag="iter_0000100"
    ckpt.weights        # {"embedding.word_embeddings.weight": full tensor, "layers.0....": ...}
    ckpt.gpt_config()   # the model's GPTConfig, from the run's recorded arguments
    ckpt.run_config     # the run's Flags as recorded, e.g. its tokenizer

Layouts (save_load.py writes them through DeepSpeed):
    PP = 1, ZeRO 0-2   mp_rank_{tp}_model_states.pt: the module's weights of TP rank tp
    PP > 1             layer_{i}-model_{tp}-model_states.pt: pipeline layer i of TP rank tp
    PP = 1, ZeRO 3     the module's weights are partitioned over the data-parallel ranks inside
                       the optimizer files; DeepSpeed's zero_to_fp32 puts each TP rank's fp32
                       weights back together
Every file is read with torch.load(weights_only=True), like training does (no unpickling of
arbitrary objects), memory-mapped so only the weights themselves are read.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass

import torch

from megatron_snm.checkpoint.layout import WORD_EMBEDDINGS, join_tensor_parallel
from megatron_snm.checkpoint.metadata import model_description
from megatron_snm.config import Flags, flags_from_dict, gpt_config_of
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import ModelDescription
from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.format import LATEST, METADATA, load_weights_only, read_latest


def load_file(path: str) -> dict:
    """One of DeepSpeed's checkpoint files, weights-only and memory-mapped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file (the checkpoint is incomplete)")
    return load_weights_only(path, mmap=True)


@dataclass
class FullCheckpoint:
    weights: dict[str, torch.Tensor]  # layout-free: GPTModel's TP=1 names, whole tensors
    metadata: dict                     # megatron_snm.json: iteration, args, parallel, model_shape, ...
    directory: str                     # the iter_N directory read

    @property
    def iteration(self) -> int:
        return self.metadata.get("iteration", 0)

    @property
    def run_config(self) -> Flags:
        """The run's flags as recorded (unknown keys from other versions are ignored)."""
        return flags_from_dict(self.metadata["args"])

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding table: the tokenizer's vocabulary plus this layout's padding."""
        return self.weights[WORD_EMBEDDINGS].shape[0]

    def gpt_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The model's configuration. `vocab_size` is the tokenizer's; without it the table's rows
        (padding included) stand for the vocabulary."""
        return gpt_config_of(self.run_config, vocab_size or self.vocab_rows)

    @property
    def model(self) -> ModelDescription:
        """The description of the model these weights are (model/describe.py), at their padding."""
        return model_description(self.metadata, self.vocab_rows)


def checkpoint_dir(load_dir: str, tag: str | None = None) -> str:
    """The iter_N directory that `load_dir`'s `latest` (or `tag`) names, checked to exist."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"{load_dir}: no such checkpoint directory")
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            if os.path.isfile(os.path.join(load_dir, METADATA)):  # given the iter_N directory itself
                return load_dir
            raise CheckpointError(f"{load_dir}: no '{LATEST}' file, so no complete checkpoint (give the directory "
                                  "that pretrain_gpt.py --save wrote)")
    path = os.path.join(load_dir, tag)
    if not os.path.isfile(os.path.join(path, METADATA)):
        raise CheckpointError(f"{os.path.join(path, METADATA)}: no such file ({load_dir}/{LATEST} names {tag!r})")
    return path


def read_metadata(path: str) -> dict:
    file = os.path.join(path, METADATA)
    try:
        with open(file) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: {err}") from None
    for key in ("args", "parallel", "model_shape"):
        if key not in metadata:
            raise CheckpointError(f"{file}: no {key!r} entry; not a megatron_snm checkpoint")
    return metadata


def read_checkpoint(load_dir: str, tag: str | None = None) -> FullCheckpoint:
    path = checkpoint_dir(load_dir, tag)
    metadata = read_metadata(path)
    parallel = metadata["parallel"]
    tp = parallel["tensor_model_parallel_size"]
    model = model_description(metadata)
    if parallel.get("zero_stage", 0) == 3 and not metadata.get("weights_only"):
        pieces = [_read_zero3_rank(path, tp_rank) for tp_rank in range(tp)]
    else:
        pieces = [module_weights(path, metadata, tp_rank, model) for tp_rank in range(tp)]
    try:
        weights = join_tensor_parallel(model, pieces, path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    ckpt = FullCheckpoint(weights, metadata, path)
    check_shapes(ckpt)
    return ckpt


def module_weights(path: str, metadata: dict, tp_rank: int, model: ModelDescription | None = None) -> dict[str, torch.Tensor]:
    """TP rank tp_rank's weights (memory-mapped, layout-free names) of a checkpoint whose model
    files hold them (every layout but ZeRO 3's). `model`: the metadata's (model_description)."""
    if metadata["parallel"]["pipeline_model_parallel_size"] > 1:
        return _read_pipeline_rank(path, tp_rank, model or model_description(metadata))
    return _module_of(os.path.join(path, f"mp_rank_{tp_rank:02d}_model_states.pt"))


def _module_of(path: str) -> dict[str, torch.Tensor]:
    module = load_file(path).get("module")
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: holds no module weights")
    return dict(module)


def _read_pipeline_rank(path: str, tp_rank: int, model: ModelDescription) -> dict[str, torch.Tensor]:
    """Every pipeline layer's file that holds weights of its own (a tied output layer's are the
    embedding's, in the embedding's file)."""
    weights = {}
    for layer in sorted({w.layer for w in model.weights.values()}):
        for name, tensor in load_file(os.path.join(path, f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")).items():
            try:
                weights[model.full_name_of(layer, name)] = tensor
            except ValueError as err:
                raise CheckpointError(f"{path}: {err}") from None
    return weights


class _WeightsOnlyTorch:
    """`torch` as zero_to_fp32 sees it, with torch.load always weights-only (DeepSpeed's own
    utility loads with weights_only=False)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(path, map_location="cpu", **_):
        return load_weights_only(path, map_location)


def _read_zero3_rank(path: str, tp_rank: int) -> dict[str, torch.Tensor]:
    """TP rank tp_rank's fp32 weights of a ZeRO-3 checkpoint, through DeepSpeed's zero_to_fp32.
    That utility reads every *_model_states.pt / *_optim_states.pt of a directory as one TP rank,
    so it is shown a directory holding only this rank's files."""
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    suffix = f"_mp_rank_{tp_rank:02d}_"
    # Optimizer files of bf16 runs are named bf16_zero_pp_rank_*.
    mine = [f for f in os.listdir(path) if "zero_pp_rank_" in f and suffix in f]
    if not any(f.endswith("optim_states.pt") for f in mine):
        raise CheckpointError(f"{path}: no ZeRO-3 optimizer files (zero_pp_rank_*{suffix}optim_states.pt) "
                              f"for TP rank {tp_rank}")
    with tempfile.TemporaryDirectory() as tmp:
        os.mkdir(os.path.join(tmp, "tag"))
        for f in mine:
            os.symlink(os.path.abspath(os.path.join(path, f)), os.path.join(tmp, "tag", f))
        # It prints progress lines meant for its own command line: kept out of the caller's output.
        with mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()), contextlib.redirect_stdout(io.StringIO()):
            try:
                return dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag"))
            except (ValueError, FileNotFoundError) as err:
                raise CheckpointError(f"{path}: {err}") from None


def check_shapes(ckpt: FullCheckpoint) -> None:
    """Refuses weights that are not the recorded model's (names and shapes)."""
    if WORD_EMBEDDINGS not in ckpt.weights:
        raise CheckpointError(f"{ckpt.directory}: no {WORD_EMBEDDINGS}")
    expected = ckpt.model.shapes()
    got = {name: tuple(t.shape) for name, t in ckpt.weights.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = [f"{n} {got[n]} (expected {expected[n]})" for n in expected if n in got and got[n] != expected[n]]
        raise CheckpointError(f"{ckpt.directory}: weights do not match the model in {METADATA}: "
                              + "; ".join(p for p in (f"missing {missing[:4]}" if missing else "",
                                                      f"unexpected {extra[:4]}" if extra else "",
                                                      f"shapes {wrong[:4]}" if wrong else "") if p))
