"""What a checkpoint's metadata (megatron_snm.json) says about its model.

The metadata records the run's arguments (Megatron's flat `args`) and the padded vocabulary of its
layout; the model they build describes itself (model/describe.py), so a reader of any checkpoint
knows every weight's name, shape, TP split and pipeline layer from the metadata alone.
"""
from __future__ import annotations

from megatron_snm.config import flags_from_dict, gpt_config_of
from megatron_snm.model.describe import ModelDescription, describe


def model_description(metadata: dict, vocab_rows: int | None = None) -> ModelDescription:
    """The model of a checkpoint's metadata, with `vocab_rows` rows in its vocabulary tables (default:
    its layout's padded vocabulary)."""
    rows = vocab_rows or metadata["model_shape"]["padded_vocab_size"]
    return describe(gpt_config_of(flags_from_dict(metadata["args"]), rows))
