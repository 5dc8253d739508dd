"""The model's one norm seam: every norm of the model (each block's two, the final one, Embed LN's,
QK-norm's) is built here, from `--normalization`.

    LayerNorm  (x - mean(x)) / sqrt(var(x) + eps) * weight + bias       (GPT-2)
    RMSNorm    x / sqrt(mean(x^2) + eps) * weight                        (Llama)

Both multiply the gradient flowing back through them by about 1/std(x) (LayerNorm) or 1/rms(x)
(RMSNorm) of their input: the paper's second mechanism holds for either, and so does its fix.
With `--apply-layernorm-1p` (Megatron's zero-centred gamma) the gain is stored as weight - 1,
initialised to zero, and the norm multiplies by (1 + weight).

Whoever needs to find the norms (the stability monitor, a converter) asks `is_norm(module)`,
never a class: a new norm is added here and nowhere else.
"""
from __future__ import annotations

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.layer_norm import FusedLayerNorm
from megatron_snm.model.rms_norm import FusedRMSNorm

NORM_CLASSES = {"LayerNorm": FusedLayerNorm, "RMSNorm": FusedRMSNorm}


def build_norm(config: GPTConfig, size: int | None = None, sequence_parallel: bool | None = None) -> torch.nn.Module:
    """The model's norm over `size` features (default the hidden size). `sequence_parallel` (default
    the config's): the gain's gradient on this TP rank covers only its part of the input, so it is
    summed over TP: a shard of the sequence (--sequence-parallel), or, for QK-norm (model/attention.py),
    this rank's heads whenever TP > 1."""
    return NORM_CLASSES[config.normalization](
        size or config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype,
        sequence_parallel=config.sequence_parallel if sequence_parallel is None else sequence_parallel,
        zero_centered_gamma=config.apply_layernorm_1p)


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, tuple(NORM_CLASSES.values()))
