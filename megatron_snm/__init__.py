"""megatron-snm: distributed GPT pre-training with the "Spike No More" stabilisation built in."""

__version__ = "0.1.0"
