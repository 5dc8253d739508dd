"""The feed-forward sub-layer: W_1 (column-parallel) -> GELU -> W_2 (row-parallel).

GELU is the exact erf form, or with `--openai-gelu` its tanh approximation (GPT-2's, for models
imported from it)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.init import output_weight_init, weight_init
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


class MLP(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.gelu_approximation = "tanh" if config.openai_gelu else "none"
        name = f"layers.{layer_number}.mlp"
        self.fc1 = ColumnParallelLinear(  # W_1
            config.hidden_size, config.ffn_hidden_size,
            init_fn=weight_init(config, f"{name}.fc1"), tp_size=config.tensor_parallel_size,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
        )
        self.fc2 = RowParallelLinear(  # W_2
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True,
            init_fn=output_weight_init(config, f"{name}.fc2"), tp_size=config.tensor_parallel_size,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximation))
