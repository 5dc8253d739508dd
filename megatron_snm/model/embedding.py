"""GPT's input embedding (token + learned position) and the tied output layer. THE PAPER'S FIX
("large shortcut") lives here, in `--embedding-norm`.

Why. Takase et al. ("Spike No More", arXiv 2312.16903) show that in a pre-LN Transformer a
LayerNorm multiplies the gradient flowing back through it by about 1/std(x) of its input x. The
shallow layers' inputs are essentially the embeddings, and with the usual small init
(sigma = sqrt(2/(5d)), ~0.013 at d = 2304) their std is ~sigma << 1: the shallow LayerNorms
amplify gradients by ~1/sigma, ~75x, and training spikes. Scaled init of W_O/W_2 (model/init.py)
keeps the residual stream near the embedding's std, which makes this worse, not better. The fix is
to give the embedding output a std near 1 without touching anything else:

    none       e = E[tokens] + P[positions]                     vanilla baseline, std ~ sqrt(2) sigma
    layernorm  e = LN(E[tokens] + P[positions])                 "Embed LN" (as in BLOOM); std ~ 1.
               The paper's recommendation with scaled init, and our default. LN is the model's
               norm: an RMSNorm under --normalization RMSNorm (rms ~ 1).
    scaled     e = sqrt(d) * E[tokens] + P[positions]           "Scaled Embed" (as in Vaswani et al.):
               a forward multiply, no new parameters; std ~ sqrt(d) sigma = sqrt(2/5) ~ 0.63 with
               the small init. It is NOT the same as initialising E with std 1 (Megatron-LM's
               --embedding-init-method-std 1, model/init.py): E is tied to the output layer, so
               that would inflate the logits; the output layer here uses E unscaled.
    detach     e = a E[tokens] + (1 - a) stopgrad(E[tokens]) + P  "Embed Detach" (GLM-130B), the
               paper's other baseline: forward unchanged, the token-embedding gradient scaled by
               a = --embed-detach-alpha (0.1). Does not change std(e).

With rotary positions (or none) there is no table P: the terms in P drop out of every mode above,
and the paper's analysis is unchanged (the first norm reads E[tokens], std ~ sigma, alone).

Each TP rank computes the same embedding output (the lookup is all-reduced over the vocabulary
split), so everything after it is replicated. With --sequence-parallel the lookup is reduce-scattered
instead: each TP rank gets its shard of the sequence and adds its rows of the position table, and
every mode above (the scale, the detach, Embed LN, dropout) runs on that shard; the output layer
all-gathers the final hidden states before multiplying. The output layer multiplies by the same table E
(tied); on a pipeline's last stage it is a `TiedOutputLayer` holding only E. With
--untie-embeddings-and-output-weights the output layer is an `UntiedOutputLayer`, its own table W
[V_padded, h] drawn from its own seed, the same in every process layout.
"""
from __future__ import annotations

import math

import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.init import embedding_weight_init, initialized_parameter, weight_init
from megatron_snm.model.norm import build_norm
from megatron_snm.parallel import rng
from megatron_snm.parallel.mappings import scatter_to_sequence_parallel_region
from megatron_snm.tensor_parallel.layers import VocabParallelEmbedding, column_parallel_linear


def word_embeddings(config: GPTConfig, init_fn=None) -> VocabParallelEmbedding:
    """A token table [V_padded, h], split by vocabulary over TP ranks: by default the embedding's E (the
    output layer's too where they are tied, --embedding-init-method-std's std), or drawn by `init_fn`
    (the untied output layer's own)."""
    return VocabParallelEmbedding(config.padded_vocab_size, config.hidden_size,
                                  init_fn=init_fn or embedding_weight_init(config, "embedding.word"),
                                  tp_size=config.tensor_parallel_size,
                                  sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype)


def output_logits(hidden: torch.Tensor, word_embedding_weight: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The output layer: hidden [b, s, h] (with `sequence_parallel`, this rank's shard [b, s / TP, h])
    -> this rank's vocabulary slice of the logits [b, s, V_padded / TP]. Uses the embedding table
    unscaled in every mode."""
    return column_parallel_linear(hidden, word_embedding_weight, sequence_parallel=sequence_parallel)


class GPTEmbedding(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.embedding_norm = config.embedding_norm
        self.max_positions = config.max_position_embeddings
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = word_embeddings(config)
        # Only a learned table lives here; rotary positions act inside attention (model/rotary.py), and
        # with them (or none) the embedding's output is a function of the token id alone.
        self.position_embeddings = initialized_parameter(
            (config.max_position_embeddings, config.hidden_size), embedding_weight_init(config, "embedding.position"),
            config.params_dtype
        ) if config.position_embedding_type == "learned_absolute" else None
        if self.embedding_norm == "layernorm":  # the model's norm: LayerNorm, or RMSNorm in a Llama
            self.norm = build_norm(config)
        self.scale = math.sqrt(config.hidden_size)
        self.detach_alpha = config.embed_detach_alpha
        self.dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(self, tokens: torch.Tensor, position_offset: int = 0) -> torch.Tensor:
        """tokens [b, s] at positions position_offset .. + s (an offset when generating with a
        KV cache) -> hidden [b, s, h], with --sequence-parallel this rank's shard [b, s / TP, h]"""
        s = tokens.shape[1]
        if position_offset + s > self.max_positions:
            raise ValueError(f"sequence of {position_offset + s} tokens is longer than --max-position-embeddings "
                             f"{self.max_positions}")
        words = self.word_embeddings(tokens)
        if self.embedding_norm == "scaled":
            words = words * self.scale
        elif self.embedding_norm == "detach":
            words = words * self.detach_alpha + words.detach() * (1.0 - self.detach_alpha)
        hidden = words
        if self.position_embeddings is not None:
            positions = self.position_embeddings[position_offset:position_offset + s]
            if self.sequence_parallel:  # this shard's rows; their gradient is all-gathered back in backward
                positions = scatter_to_sequence_parallel_region(positions, dim=0)
            hidden = words + positions
        if self.embedding_norm == "layernorm":
            hidden = self.norm(hidden)
        return rng.dropout(self.dropout, hidden, split=self.sequence_parallel)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer, tied to this embedding's table."""
        return output_logits(hidden, self.word_embeddings.weight, self.sequence_parallel)


class TiedOutputLayer(torch.nn.Module):
    """The output layer of a pipeline's last stage: only the tied token table, no position table or
    Embed LN. The pipeline keeps its weight equal to the first stage's embedding table."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.word_embeddings = word_embeddings(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(hidden, self.word_embeddings.weight, self.sequence_parallel)


class UntiedOutputLayer(torch.nn.Module):
    """The output layer of --untie-embeddings-and-output-weights: a table of its own."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = word_embeddings(config, weight_init(config, "output.word")).weight  # sigma, as Megatron's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(hidden, self.weight, self.sequence_parallel)
