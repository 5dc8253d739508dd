"""Initialisation statistics: each weight matrix's measured std matches its formula, and the
embedding output's std in each --embedding-norm mode is what the paper says (d = 512)."""
import math

import pytest
import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.embedding import GPTEmbedding
from megatron_snm.model.gpt import GPTModel

D, N = 512, 6
SHAPE = dict(num_layers=N, hidden_size=D, num_attention_heads=8, seq_length=128, vocab_size=1000)
SMALL_SIGMA = math.sqrt(2 / (5 * D))
OUTPUT_MATRICES = ("attention.dense.weight", "mlp.fc2.weight")  # W_O and W_2


pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_std(name, sigma, scaled_init):
    if name.endswith(OUTPUT_MATRICES) and scaled_init:
        return sigma / math.sqrt(2 * N)
    return sigma


@pytest.mark.parametrize("init, sigma, scaled_init", [
    (dict(init_method="small"), SMALL_SIGMA, True),
    (dict(init_method="normal", init_method_std=0.02), 0.02, True),
    (dict(init_method="small", scaled_init=False), SMALL_SIGMA, False),
])
def test_weight_std_matches_formula(init, sigma, scaled_init):
    model = GPTModel(GPTConfig(**SHAPE, **init))
    print(f"\ninit {init}: sigma {sigma:.5f}, sigma/sqrt(2N) {sigma / math.sqrt(2 * N):.5f}")
    checked = 0
    for name, param in model.named_parameters():
        if "norm" in name or "ln_" in name:
            assert torch.equal(param, torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            expected = _expected_std(name, sigma, scaled_init)
            std, mean = param.std().item(), param.mean().item()
            if name.startswith(("embedding", "layers.0.", "layers.5.")):
                print(f"  {name:40s} std {std:.5f}  expected {expected:.5f}  ratio {std / expected:.4f}")
            assert abs(std / expected - 1) < 0.02, (name, std, expected)
            assert abs(mean) < 0.05 * expected, (name, mean)
            checked += 1
    assert checked == 2 + 4 * N  # word + position embeddings, and QKV, W_O, W_1, W_2 per layer


def test_embedding_output_std_per_mode():
    """With sigma = sqrt(2/(5d)): Embed LN gives std 1; Scaled Embed sqrt(d) * sigma = sqrt(2/5);
    none (and detach, whose forward is the same) the sum of two N(0, sigma^2) tables, sqrt(2) sigma
    -- both far below 1, which is what makes the shallow LayerNorms amplify gradients."""
    tokens = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    expected = {
        "layernorm": 1.0,
        "scaled": math.sqrt(2 / 5 + SMALL_SIGMA ** 2),  # sqrt(d) sigma token part + sigma position part
        "none": math.sqrt(2) * SMALL_SIGMA,
        "detach": math.sqrt(2) * SMALL_SIGMA,
    }
    print(f"\nd={D}, sigma={SMALL_SIGMA:.5f}, sqrt(2/5)={math.sqrt(2 / 5):.4f}")
    for mode, want in expected.items():
        embedding = GPTEmbedding(GPTConfig(**SHAPE, init_method="small", embedding_norm=mode))
        with torch.no_grad():
            std = embedding(tokens).std().item()
        print(f"  embedding_norm={mode:9s} output std {std:.4f}  expected {want:.4f}")
        assert abs(std / want - 1) < 0.03, (mode, std, want)
    assert abs(expected["scaled"] / math.sqrt(2 / 5) - 1) < 0.01
