"""The tiny GPT shapes the model tests use: one base, and each test's changes to it spelled out."""

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=500, init_method="small")


def tiny(**changes) -> dict:
    """GPTConfig keyword arguments: the base shape with `changes`."""
    return {**BASE, **changes}
