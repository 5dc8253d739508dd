"""Weight initialisation: the paper's "small sub-layers" condition and TP/PP-invariant seeding.

- sigma: `--init-method-std` (default 0.02), or with `--init-method small` sigma = sqrt(2 / (5 d))
  (Nguyen & Salazar's "small init", ~0.0132 at d = 2304). Every weight matrix and both embedding
  tables are drawn from N(0, sigma^2); biases are zero, LayerNorm gains one.
- `--embedding-init-method-std S` (Megatron-LM's flag, its answer to the same paper): the embedding's
  tables, the token table and the learned position table, are drawn from N(0, S^2) instead (default:
  sigma, as Megatron's default is --init-method-std). Where the output layer is tied it is the token
  table, so S also scales the logits (S = 1: logits of std ~ sqrt(d) x the final norm's output); an
  untied output layer keeps sigma, as in Megatron. Unlike Scaled Embed (model/embedding.py), which
  multiplies the embedding output in the forward pass and leaves the table small.
- scaled init (default on, `--no-scaled-init` turns it off): the two matrices that write into the
  residual stream, attention's W_O and the MLP's W_2, get sigma / sqrt(2 N) with N layers. Each
  sub-layer then adds little to the residual stream, so its std stays near that of the embedding
  instead of growing layer after layer (the paper's first mechanism).

Seeding: every weight draws from its own torch.Generator seeded by (config.seed, the weight's name),
e.g. "layers.3.mlp.fc2". So a weight's values do not depend on the TP size (the full weight is
drawn, each rank keeps its slice), nor on which other layers a pipeline stage builds, nor on the
order in which modules are constructed.
"""
from __future__ import annotations

import hashlib
import math

import torch

from megatron_snm.model.config import GPTConfig


def sigma(config: GPTConfig) -> float:
    if config.init_method == "small":
        return math.sqrt(2.0 / (5.0 * config.hidden_size))
    return config.init_method_std


def embedding_sigma(config: GPTConfig) -> float:
    """std of the embedding's token and position tables."""
    return config.embedding_init_method_std if config.embedding_init_method_std is not None else sigma(config)


def output_sigma(config: GPTConfig) -> float:
    """std of W_O and W_2."""
    s = sigma(config)
    return s / math.sqrt(2.0 * config.num_layers) if config.scaled_init else s


def weight_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for weight `name` (Python's hash() is salted per process, so not that)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normal_init(std: float, seed: int, name: str):
    """An `init_fn` for the tensor-parallel layers: fills the full weight from N(0, std^2)."""
    def init(weight: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=weight.device).manual_seed(weight_seed(seed, name))
        return weight.normal_(0.0, std, generator=generator)
    return init


def weight_init(config: GPTConfig, name: str):
    """The init_fn of weight `name`: N(0, sigma^2) from its own seeded generator."""
    return normal_init(sigma(config), config.seed, name)


def embedding_weight_init(config: GPTConfig, name: str):
    """For the embedding's tables: N(0, --embedding-init-method-std^2), by default sigma's."""
    return normal_init(embedding_sigma(config), config.seed, name)


def output_weight_init(config: GPTConfig, name: str):
    """For W_O and W_2, scaled by 1/sqrt(2N) unless --no-scaled-init."""
    return normal_init(output_sigma(config), config.seed, name)


def initialized_parameter(shape, init, dtype: torch.dtype) -> torch.nn.Parameter:
    """A replicated (not TP-split) weight filled by `init`: drawn in fp32 on the CPU, then cast, so
    its values are the same for every dtype and device. Left uninitialised on the meta device."""
    param = torch.nn.Parameter(torch.empty(shape, dtype=dtype))  # honours a `with torch.device(...)`
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(init(torch.empty(shape, dtype=torch.float32, device="cpu")))
    return param
