"""The model's configuration: shapes, initialisation, the paper's embedding mode, dropout, precision.

Field names follow Megatron-LM's flags (`--num-layers` -> num_layers, ...), so the training side
derives it from its flags by name (config/resolve.py); `validate` names the flag at fault. The model
reads nothing else: the tensor-parallel size is a field here, not a process-group global, so a
layer's shape is fixed at construction and checked once (GPTModel / the pipeline stages call validate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EMBEDDING_NORMS = ("none", "layernorm", "scaled", "detach")
INIT_METHODS = ("normal", "small")
RECOMPUTE_GRANULARITIES = ("full", "selective")  # or None: no recompute
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding: the vocabulary grows to a multiple of divisible_by x TP, so each TP rank
    holds an equal, aligned slice. Padded rows are ordinary (never-seen) tokens."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


@dataclass
class GPTConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    seq_length: int
    vocab_size: int  # the tokenizer's; padded inside (see padded_vocab_size)
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    max_position_embeddings: int | None = None  # rows of the position table; default seq_length
    init_method: str = "normal"  # "normal": N(0, init_method_std); "small": sigma = sqrt(2 / (5 d))
    init_method_std: float = 0.02
    scaled_init: bool = True  # W_O and W_2 get sigma / sqrt(2 N)
    embedding_norm: str = "layernorm"  # none | layernorm | scaled | detach (see model/embedding.py)
    embed_detach_alpha: float = 0.1
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = False  # the output layer gets its own table
    # Activation recompute (Megatron's): "full" recomputes whole blocks, by `recompute_method`
    # ("uniform": chunks of recompute_num_layers blocks; "block": the first recompute_num_layers
    # blocks of each pipeline stage); "selective" recomputes attention's core only.
    recompute_granularity: str | None = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    attention_backend: str = "auto"  # PyTorch SDPA kernel (model/attention.py)
    openai_gelu: bool = False  # GELU's tanh approximation (GPT-2's "gelu_new") instead of the exact erf form
    make_vocab_size_divisible_by: int = 128
    tensor_parallel_size: int = 1  # how many ranks split each layer (--tensor-model-parallel-size)
    # --sequence-parallel: with TP > 1, the activations outside the TP layers (embedding output,
    # LayerNorms, dropout, residual stream) are split along the sequence over the TP ranks. A layout of
    # the activations only: the weights are the same, so a checkpoint does not depend on it.
    sequence_parallel: bool = False
    params_dtype: torch.dtype = torch.float32
    seed: int = 1234  # initialisation seed

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tensor_parallel_size, self.make_vocab_size_divisible_by)

    def validate(self) -> "GPTConfig":
        """Raises ValueError naming the Megatron flag at fault; returns self."""
        tp = self.tensor_parallel_size
        positive = {
            "--num-layers": self.num_layers, "--hidden-size": self.hidden_size,
            "--num-attention-heads": self.num_attention_heads, "--seq-length": self.seq_length,
            "vocabulary size (from the tokenizer)": self.vocab_size, "--ffn-hidden-size": self.ffn_hidden_size,
            "--make-vocab-size-divisible-by": self.make_vocab_size_divisible_by,
            "--tensor-model-parallel-size": tp,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads})"
            )
        for flag, value in (("--num-attention-heads", self.num_attention_heads),
                            ("--ffn-hidden-size", self.ffn_hidden_size)):
            if value % tp:
                raise ValueError(f"{flag} ({value}) must be divisible by --tensor-model-parallel-size ({tp})")
        if self.sequence_parallel and self.seq_length % tp:
            raise ValueError(f"--sequence-parallel splits the sequence over the TP ranks: --seq-length "
                             f"({self.seq_length}) must be divisible by --tensor-model-parallel-size ({tp})")
        if self.max_position_embeddings < self.seq_length:
            raise ValueError(f"--max-position-embeddings ({self.max_position_embeddings}) must be >= --seq-length "
                             f"({self.seq_length})")
        if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
            raise ValueError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise ValueError(f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if self.recompute_num_layers < 1 or (self.recompute_method == "block"
                                             and self.recompute_num_layers > self.num_layers):
            raise ValueError(f"--recompute-num-layers ({self.recompute_num_layers}) must be in 1..--num-layers "
                             f"({self.num_layers})")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.init_method not in INIT_METHODS:
            raise ValueError(f"--init-method must be one of {INIT_METHODS}, got {self.init_method!r}")
        if self.init_method_std <= 0:
            raise ValueError(f"--init-method-std must be > 0, got {self.init_method_std}")
        if self.embedding_norm not in EMBEDDING_NORMS:
            raise ValueError(f"--embedding-norm must be one of {EMBEDDING_NORMS}, got {self.embedding_norm!r}")
        if not 0.0 <= self.embed_detach_alpha <= 1.0:
            raise ValueError(f"--embed-detach-alpha must be in [0, 1], got {self.embed_detach_alpha}")
        for flag, p in (("--hidden-dropout", self.hidden_dropout), ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{flag} must be in [0, 1), got {p}")
        if self.params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"params_dtype must be float32, bfloat16 or float16 (--bf16/--fp16), got {self.params_dtype}")
        return self
