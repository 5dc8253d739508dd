"""The feed-forward sub-layer, chosen by `--swiglu` (`build_mlp`):

    MLP        W_2 gelu(x W_1)                       GPT-2 (exact erf GELU, or with --openai-gelu its
                                                      tanh approximation, for models imported from it)
    SwiGLUMLP  W_2 (silu(x W_gate) * x W_1)          Llama (Shazeer, "GLU variants"; Megatron's --swiglu)

W_1 and W_gate are column-parallel, W_2 row-parallel: each TP rank computes its slice of the inner
features and W_2 sums the ranks' contributions. W_gate and W_1 are two layers rather than one
fused matrix, so each is layout-free (the same weights for any TP size) with no interleaving, and
each is Hugging Face Llama's gate_proj / up_proj as it is. W_2 writes into the residual stream:
the paper's scaled init gives it sigma / sqrt(2N) (model/init.py), in both variants.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.init import output_weight_init, weight_init
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _column(config: GPTConfig, name: str) -> ColumnParallelLinear:
    return ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, init_fn=weight_init(config, name),
                                tp_size=config.tensor_parallel_size, bias=config.add_bias_linear,
                                sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype)


def _output(config: GPTConfig, name: str) -> RowParallelLinear:
    return RowParallelLinear(config.ffn_hidden_size, config.hidden_size, input_is_parallel=True,
                             bias=config.add_bias_linear, init_fn=output_weight_init(config, name),
                             tp_size=config.tensor_parallel_size, sequence_parallel=config.sequence_parallel,
                             params_dtype=config.params_dtype)


class MLP(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.gelu_approximation = "tanh" if config.openai_gelu else "none"
        name = f"layers.{layer_number}.mlp"
        self.fc1 = _column(config, f"{name}.fc1")  # W_1
        self.fc2 = _output(config, f"{name}.fc2")  # W_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu_approximation))


class SwiGLUMLP(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        name = f"layers.{layer_number}.mlp"
        self.gate = _column(config, f"{name}.gate")  # W_gate
        self.fc1 = _column(config, f"{name}.fc1")  # W_1 (Llama's up_proj)
        self.fc2 = _output(config, f"{name}.fc2")  # W_2 (Llama's down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.gate(x)) * self.fc1(x))


def build_mlp(config: GPTConfig, layer_number: int) -> torch.nn.Module:
    return SwiGLUMLP(config, layer_number) if config.swiglu else MLP(config, layer_number)
