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
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")
INIT_METHODS = ("normal", "small")
RECOMPUTE_GRANULARITIES = ("full", "selective")  # or None: no recompute
RECOMPUTE_METHODS = ("uniform", "block")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's default --ffn-hidden-size: 4 h, or with --swiglu 2/3 of that (its three matrices
    then hold about as many weights as GELU's two) rounded down to a multiple of 64."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


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
    ffn_hidden_size: int | None = None  # default 4 * hidden_size; with swiglu Megatron's 8/3 h rounded down to 64
    max_position_embeddings: int | None = None  # rows of the position table; default seq_length
    # The architecture's seams (Megatron-LM's flags and meanings). GPT-2: the defaults. Llama-family:
    # rope, RMSNorm, swiglu, query groups, no biases, usually an untied output layer.
    position_embedding_type: str = "learned_absolute"  # learned_absolute (a table) | rope | none
    rotary_base: int = 10000
    rotary_percent: float = 1.0  # the share of each head's channels that rotary positions rotate
    rotary_interleaved: bool = False  # rotate (even, odd) pairs (RoFormer) instead of (first, second) half (Llama)
    normalization: str = "LayerNorm"  # every norm of the model: LayerNorm | RMSNorm (model/norm.py)
    apply_layernorm_1p: bool = False  # norm gains stored zero-centred: the norm multiplies by (1 + weight)
    swiglu: bool = False  # the MLP is SwiGLU: W_2 (silu(x W_gate) * x W_1) instead of W_2 gelu(x W_1)
    num_query_groups: int | None = None  # grouped-query attention: K/V heads; default (None) = attention heads
    kv_channels: int | None = None  # channels per attention head; default hidden_size / num_attention_heads
    add_bias_linear: bool = True  # biases in QKV, W_O, W_1 (and W_gate), W_2 (--disable-bias-linear: none)
    init_method: str = "normal"  # "normal": N(0, init_method_std); "small": sigma = sqrt(2 / (5 d))
    init_method_std: float = 0.02
    scaled_init: bool = True  # W_O and W_2 get sigma / sqrt(2 N)
    embedding_init_method_std: float | None = None  # std of the embedding's tables (Megatron's); None: sigma
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
    qk_layernorm: bool = False  # the model's norm on each head's queries and keys, before rotary positions
    z_loss_weight: float = 0.0  # PaLM's z-loss: the loss trained on adds W x mean log^2 Z (model/gpt.py GPTLoss)
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
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size, self.swiglu)
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and self.num_attention_heads > 0:
            self.kv_channels = self.hidden_size // self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary positions rotate (Megatron: kv_channels x rotary_percent)."""
        return int(self.kv_channels * self.rotary_percent)

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
        if self.hidden_size % self.num_attention_heads and self.kv_channels == self.hidden_size // self.num_attention_heads:
            raise ValueError(
                f"--hidden-size ({self.hidden_size}) must be divisible by --num-attention-heads "
                f"({self.num_attention_heads}), or give --kv-channels"
            )
        if self.kv_channels < 1:
            raise ValueError(f"--kv-channels must be >= 1, got {self.kv_channels}")
        groups = self.num_query_groups
        if not 1 <= groups <= self.num_attention_heads or self.num_attention_heads % groups:
            raise ValueError(f"--num-query-groups ({groups}) must divide --num-attention-heads "
                             f"({self.num_attention_heads})")
        for flag, value in (("--num-attention-heads", self.num_attention_heads),
                            ("--num-query-groups" if groups != self.num_attention_heads else "--num-attention-heads",
                             groups),
                            ("--ffn-hidden-size", self.ffn_hidden_size)):
            if value % tp:
                raise ValueError(f"{flag} ({value}) must be divisible by --tensor-model-parallel-size ({tp})")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"--position-embedding-type must be one of {POSITION_EMBEDDING_TYPES}, got "
                             f"{self.position_embedding_type!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.position_embedding_type == "rope":
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ValueError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise ValueError(f"rotary positions rotate pairs of channels: --kv-channels ({self.kv_channels}) x "
                                 f"--rotary-percent ({self.rotary_percent}) = {self.rotary_dim} must be even and >= 2")
            if self.rotary_base < 1:
                raise ValueError(f"--rotary-base must be >= 1, got {self.rotary_base}")
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
        if self.embedding_init_method_std is not None and not 0 < self.embedding_init_method_std < float("inf"):
            raise ValueError(f"--embedding-init-method-std must be > 0, got {self.embedding_init_method_std}")
        if not 0 <= self.z_loss_weight < float("inf"):
            raise ValueError(f"--z-loss-weight must be >= 0 (0: no z-loss), got {self.z_loss_weight}")
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
