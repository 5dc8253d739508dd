"""The tiny GPT shapes the model tests use: one base, and each test's changes to it spelled out;
the batch they feed it, and how far apart two runs' tensors are."""
import torch

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=500, init_method="small")


def tiny(**changes) -> dict:
    """GPTConfig keyword arguments: the base shape with `changes`."""
    return {**BASE, **changes}


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, labels, loss mask) of 2 sequences of BASE's length, the same on every rank."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BASE["vocab_size"], (2, BASE["seq_length"]), generator=g)
    labels = torch.randint(0, BASE["vocab_size"], (2, BASE["seq_length"]), generator=g)
    loss_mask = (torch.rand(2, BASE["seq_length"], generator=g) > 0.2).float()
    return tokens, labels, loss_mask


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference `b`."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
