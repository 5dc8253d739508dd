"""Causal self-attention with query groups, heads split over tensor-parallel ranks.

Multi-head attention (GPT-2) has one key/value head per query head; grouped-query attention
(`--group-query-attention --num-query-groups G`, Llama 2/3) shares each key/value head among the
heads / G query heads of its group, which shrinks K/V (and the inference KV cache) by heads / G.
QKV is one column-parallel projection whose output features are laid out group by group,
[group, (q_1 .. q_{heads/G}, k, v), head_dim] (Megatron's layout; with G = heads it is
[head, (q, k, v), head_dim]), so a contiguous slice of it is whole groups: each TP rank attends with
its own groups, and W_O (row-parallel) sums the ranks' contributions. With rotary positions
(model/rotary.py) the queries and keys are rotated by their positions before the product.

With `--qk-layernorm` (Megatron's) each head's queries and keys first go through the model's norm
(model/norm.py) over the head's channels, one gain (and bias) shared by every head, as Megatron's
q_layernorm / k_layernorm: the logits q.k / sqrt(d) are then bounded by the gains, whatever the
weights of QKV grow to (Dehghani et al. 2023, Wortsman et al. 2023). The norms come before rotary
positions, which only turn channel pairs. Each TP rank normalises its own heads with the replicated
gains, so their gradient covers only its heads and is summed over the TP ranks in the backward pass,
as for a norm on a sequence shard.

The core, softmax(QK^T / sqrt(d)) V, is `CoreAttention` (Megatron's DotProductAttention): a module of
its own so that the stability monitor can read the logits of the q and k it receives (hooked only on
the steps it captures). It runs PyTorch's SDPA on the kernel `--attention-backend` names
(Megatron's names mapped onto SDPA's: flash -> FLASH_ATTENTION, fused -> EFFICIENT_ATTENTION,
unfused / local -> MATH; auto lets PyTorch choose). `--recompute-granularity selective` recomputes
only this core in the backward pass (Megatron's selective recompute): it holds the largest
activations (the b x heads x s x s attention probabilities, where the kernel keeps them) and costs
the least to recompute.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.init import output_weight_init, weight_init
from megatron_snm.model.norm import build_norm
from megatron_snm.model.rotary import RotaryEmbedding
from megatron_snm.parallel.rng import checkpoint, get_rng_tracker
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "fused": SDPBackend.EFFICIENT_ATTENTION,
                 "unfused": SDPBackend.MATH, "local": SDPBackend.MATH}


def attention_kernel(backend: str):
    """The context that restricts SDPA to `backend`'s kernel (nothing for auto)."""
    return sdpa_kernel(SDPA_BACKENDS[backend]) if backend in SDPA_BACKENDS else contextlib.nullcontext()


def check_attention_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                            dropout: bool) -> None:
    """Raises ValueError, naming the flag, when `backend`'s kernel cannot run causal attention of this
    head size, dtype and dropout on `device` (e.g. fused: PyTorch has no memory-efficient kernel on CPU)."""
    if backend not in SDPA_BACKENDS:
        return
    q = torch.zeros(1, 1, 8, head_dim, dtype=dtype, device=device, requires_grad=True)
    try:
        with attention_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1 if dropout else 0.0, is_causal=True).sum().backward()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--attention-backend {backend} (SDPA's {SDPA_BACKENDS[backend].name}) is not available "
                         f"for {dtype} with head size {head_dim} on {device.type}: {first}. Use --attention-backend "
                         "auto (PyTorch chooses) or unfused") from None


class CoreAttention(torch.nn.Module):
    """softmax(QK^T / sqrt(d)) V of one TP rank's heads; no parameters."""

    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout
        self.backend = config.attention_backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = True) -> torch.Tensor:
        """q [b, heads, s, d], k and v [b, groups, s_k, d]; `mask` (bool, True: attend) or `causal`."""
        dropout_p = self.dropout_p if self.training else 0.0
        # Attention probabilities are split over TP ranks (by head): their dropout must draw from
        # the per-rank stream.
        rng = get_rng_tracker().fork() if dropout_p > 0 else contextlib.nullcontext()
        with rng, attention_kernel(self.backend):
            # With query groups, k and v hold one head per group: SDPA lets each group's key/value head
            # serve its query heads without copying it heads / groups times (enable_gqa).
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                                  enable_gqa=k.shape[1] != q.shape[1])


@torch.no_grad()
def max_attention_logit(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                        causal: bool = True) -> torch.Tensor:
    """The largest pre-softmax logit q.k / sqrt(d) that CoreAttention's softmax sees (over batch, heads and
    the positions each query attends to), in fp32. One key/value group at a time, so at most
    [b, heads / groups, s, s_k] logits exist at once."""
    per_group = q.shape[1] // k.shape[1]
    s, s_k = q.shape[2], k.shape[2]
    if causal:  # SDPA's is_causal: query i sees keys 0 .. i (top-left aligned)
        mask = torch.ones(s, s_k, dtype=torch.bool, device=q.device).tril()
    largest = torch.full((), -math.inf, dtype=torch.float32, device=q.device)
    for group in range(k.shape[1]):
        queries = q[:, group * per_group:(group + 1) * per_group].float()
        logits = queries @ k[:, group:group + 1].float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask, -math.inf)
        largest = torch.maximum(largest, logits.max())
    return largest


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config: GPTConfig, layer_number: int):
        super().__init__()
        tp = config.tensor_parallel_size
        self.local_heads = config.num_attention_heads // tp
        self.local_groups = config.num_query_groups // tp
        self.head_dim = config.head_dim
        self.recompute_core = config.recompute_granularity == "selective"
        if config.qk_layernorm:
            # Replicated gains applied to this rank's heads only: their gradient is summed over TP.
            self.q_layernorm = build_norm(config, config.head_dim, sequence_parallel=tp > 1)
            self.k_layernorm = build_norm(config, config.head_dim, sequence_parallel=tp > 1)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.core_attention = CoreAttention(config, layer_number)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base, config.rotary_interleaved) \
            if config.position_embedding_type == "rope" else None
        projection = config.num_attention_heads * config.head_dim
        name = f"layers.{layer_number}.attention"
        self.qkv = ColumnParallelLinear(
            config.hidden_size, projection + 2 * config.num_query_groups * config.head_dim,
            init_fn=weight_init(config, f"{name}.qkv"), tp_size=tp, bias=config.add_bias_linear,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
        )
        self.dense = RowParallelLinear(  # W_O
            projection, config.hidden_size, input_is_parallel=True, bias=config.add_bias_linear,
            init_fn=output_weight_init(config, f"{name}.dense"), tp_size=tp,
            sequence_parallel=config.sequence_parallel, params_dtype=config.params_dtype,
        )

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """x [b, s, h] (with --sequence-parallel this rank's shard [b, s / TP, h]; QKV gathers the
        whole sequence). With `kv_cache` (inference/kv_cache.py) x holds the s tokens after those
        cached: their keys and values are appended, and they attend to all the cached ones."""
        qkv = self.qkv(x)
        b, s, _ = qkv.shape
        per_group = self.local_heads // self.local_groups
        qkv = qkv.view(b, s, self.local_groups, per_group + 2, self.head_dim)
        q, k, v = qkv.split([per_group, 1, 1], dim=3)
        q = q.reshape(b, s, self.local_heads, self.head_dim).transpose(1, 2)  # [b, local_heads, s, head_dim]
        k, v = k.squeeze(3).transpose(1, 2), v.squeeze(3).transpose(1, 2)  # [b, local_groups, s, head_dim]
        if self.q_layernorm is not None:  # over each head's channels, before rotary positions (Megatron's order)
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        past = kv_cache.length if kv_cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, past), self.rotary(k, past)
        mask, causal = None, True
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
            if past:  # new token i sits at position past + i: it sees keys 0 .. past + i
                causal = False
                mask = None if s == 1 else torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            context = checkpoint(self.core_attention, q, k, v)  # replays the dropout mask exactly
        else:
            context = self.core_attention(q, k, v, mask, causal)
        return self.dense(context.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))
