"""Our checkpoint -> a Hugging Face model directory (`AutoModelForCausalLM.from_pretrained(dir)`).

The architecture the checkpoint records chooses the family (`hf_family`, the one place): rotary
positions -> Llama, learned positions -> GPT-2; what neither holds exactly is refused in one line
that says what to train with.

Llama (rotary positions, RMSNorm, SwiGLU, no biases; any query groups; llama_mapping.py): a plain
LlamaForCausalLM in every embedding mode. Embed LN and Scaled Embed fold into the input table
(the embedding's output depends on the token alone), the output layer keeps E, so those modes
write tie_word_embeddings false; none and detach write the table tied (or untied, as trained).

GPT-2 (learned positions, LayerNorm, GELU, biases; gpt2_mapping.py):
    embedding_norm  what is written
    none, detach    GPT2LMHeadModel, tied embeddings (Embed Detach changes only training gradients)
    scaled          GPT2LMHeadModel, wte = sqrt(d) E and lm_head = E, untied
    (any, with --untie-embeddings-and-output-weights: lm_head is the output layer's own table, untied)
    layernorm       GPT2EmbedLNLMHeadModel (modeling_gpt2_embed_ln.py, copied into the directory
                    and named in config.json's auto_map): load with trust_remote_code=True

The vocabulary is the tokenizer's (the padding rows of the table are cut), so the exported
logits are ours over the real tokens. Weights go through transformers' own save_pretrained:
safetensors, sharded with an index above `max_shard_size`; the directory is written under a
temporary name of this run's own and renamed when complete (every file mode 0666 less the umask),
onto a directory that does not exist or is empty: nothing already there is replaced or removed.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_snm.atomic import publish_directory, temporary_path
from megatron_snm.checkpoint.read import FullCheckpoint
from megatron_snm.checkpoint.errors import CheckpointError
from megatron_snm.checkpoint.tokenizer import TokenizerSpec
from megatron_snm.data.tokenizers import Tokenizer
from megatron_snm.hf.gpt2_mapping import to_hf_gpt2
from megatron_snm.hf.llama_mapping import to_hf_llama
from megatron_snm.model.config import GPTConfig


LLAMA_FLAGS = "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear"


def gpt2_config(gpt: GPTConfig, vocab_size: int, eod: int | None):
    """The transformers config of model `gpt` as GPT-2."""
    from transformers import GPT2Config

    from megatron_snm.hf.modeling_gpt2_embed_ln import GPT2EmbedLNConfig

    kind = GPT2EmbedLNConfig if gpt.embedding_norm == "layernorm" else GPT2Config
    return kind(
        vocab_size=vocab_size, n_positions=gpt.max_position_embeddings, n_embd=gpt.hidden_size, n_layer=gpt.num_layers,
        n_head=gpt.num_attention_heads, n_inner=gpt.ffn_hidden_size,
        activation_function="gelu_new" if gpt.openai_gelu else "gelu",  # "gelu" is exact erf GELU, like F.gelu
        resid_pdrop=gpt.hidden_dropout, embd_pdrop=gpt.hidden_dropout, attn_pdrop=gpt.attention_dropout,
        layer_norm_epsilon=gpt.layernorm_epsilon, initializer_range=gpt.init_method_std,
        tie_word_embeddings=gpt.embedding_norm != "scaled" and not gpt.untie_embeddings_and_output_weights,
        bos_token_id=eod, eos_token_id=eod, pad_token_id=eod,
    )


def llama_config(gpt: GPTConfig, vocab_size: int, eod: int | None, tied: bool):
    """The transformers config of model `gpt` as Llama."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=gpt.hidden_size, intermediate_size=gpt.ffn_hidden_size,
        num_hidden_layers=gpt.num_layers, num_attention_heads=gpt.num_attention_heads,
        num_key_value_heads=gpt.num_query_groups, head_dim=gpt.head_dim, hidden_act="silu",
        max_position_embeddings=gpt.max_position_embeddings, initializer_range=gpt.init_method_std,
        rms_norm_eps=gpt.layernorm_epsilon, rope_theta=float(gpt.rotary_base), tie_word_embeddings=tied,
        attention_bias=False, mlp_bias=False, attention_dropout=gpt.attention_dropout,
        bos_token_id=eod, eos_token_id=eod, pad_token_id=eod,
    )


def check_gpt2_architecture(gpt: GPTConfig) -> None:
    """Refuses, in one line, a checkpoint whose architecture GPT-2's classes cannot hold."""
    differs = [flag for flag, other in (
        (f"--position-embedding-type {gpt.position_embedding_type}", gpt.position_embedding_type != "learned_absolute"),
        (f"--normalization {gpt.normalization}", gpt.normalization != "LayerNorm"),
        ("--swiglu", gpt.swiglu), ("--group-query-attention", gpt.num_query_groups != gpt.num_attention_heads),
        ("--kv-channels", gpt.kv_channels * gpt.num_attention_heads != gpt.hidden_size),
        ("--disable-bias-linear", not gpt.add_bias_linear), ("--apply-layernorm-1p", gpt.apply_layernorm_1p),
    ) if other]
    if differs:
        raise ValueError(f"this checkpoint is neither a GPT-2 nor a Llama architecture ({', '.join(differs)} with "
                         f"learned positions): train with {LLAMA_FLAGS} for a Llama export, or with GPT-2's "
                         "defaults (learned positions, LayerNorm, GELU, biases) for a GPT-2 export")


def check_llama_architecture(gpt: GPTConfig) -> None:
    """Refuses, in one line, a rotary checkpoint that transformers' Llama cannot hold exactly."""
    differs = [flag for flag, other in (
        (f"--normalization {gpt.normalization}", gpt.normalization != "RMSNorm"),
        ("no --swiglu", not gpt.swiglu), ("biases (no --disable-bias-linear)", gpt.add_bias_linear),
        (f"--rotary-percent {gpt.rotary_percent}", gpt.rotary_percent != 1.0),
        (f"--hidden-size {gpt.hidden_size} not divisible by --num-attention-heads {gpt.num_attention_heads}",
         gpt.hidden_size % gpt.num_attention_heads != 0),
    ) if other]
    if differs:
        raise ValueError(f"this rotary checkpoint has no Hugging Face Llama counterpart ({', '.join(differs)}): "
                         f"train with {LLAMA_FLAGS} (and --rotary-percent 1.0) for a Llama export")


def hf_family(gpt: GPTConfig) -> str:
    """"llama" or "gpt2": the transformers family that holds model `gpt` exactly (else ValueError)."""
    if gpt.qk_layernorm:
        raise ValueError("this checkpoint has --qk-layernorm: neither Hugging Face GPT-2 nor Llama has a norm on the "
                         "queries and keys, so export to Hugging Face is not implemented for it")
    if gpt.position_embedding_type == "rope":
        check_llama_architecture(gpt)
        return "llama"
    check_gpt2_architecture(gpt)
    return "gpt2"


def _gpt2_model(ckpt: FullCheckpoint, gpt: GPTConfig, vocab_size: int, eod: int | None):
    """(GPT-2 model class, its config, its state dict)."""
    from transformers import GPT2LMHeadModel

    from megatron_snm.hf.modeling_gpt2_embed_ln import GPT2EmbedLNConfig, GPT2EmbedLNLMHeadModel

    weights = to_hf_gpt2(ckpt.weights, ckpt.model, gpt.num_attention_heads, gpt.hidden_size, gpt.embedding_norm,
                         vocab_size)
    kind = GPT2EmbedLNLMHeadModel if gpt.embedding_norm == "layernorm" else GPT2LMHeadModel
    if kind is GPT2EmbedLNLMHeadModel:
        # save_pretrained then copies modeling_gpt2_embed_ln.py beside the weights and writes auto_map.
        GPT2EmbedLNConfig.register_for_auto_class()
        GPT2EmbedLNLMHeadModel.register_for_auto_class("AutoModelForCausalLM")
    return kind, gpt2_config(gpt, vocab_size, eod), weights


def _llama_model(ckpt: FullCheckpoint, gpt: GPTConfig, vocab_size: int, eod: int | None):
    """(LlamaForCausalLM, its config, its state dict)."""
    from transformers import LlamaForCausalLM

    weights, tied = to_hf_llama(ckpt.weights, ckpt.model, gpt, vocab_size)
    return LlamaForCausalLM, llama_config(gpt, vocab_size, eod, tied), weights


def _with_rope_theta(config_file: str) -> None:
    """Adds the top-level rope_theta that readers before transformers 5's rope_parameters look for
    (transformers 4, llama.cpp's converter); transformers 5 reads either."""
    with open(config_file) as f:
        config = json.load(f)
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def export_to_hf(ckpt: FullCheckpoint, output_dir: str, tokenizer: tuple[TokenizerSpec, Tokenizer] | None = None,
                 dtype: torch.dtype | None = None, max_shard_size: str = "5GB") -> str:
    """Writes `ckpt` as a transformers model under `output_dir` (with the tokenizer if given);
    returns the model class written. dtype: of the weights written (default: the checkpoint's)."""
    from transformers import GenerationConfig

    from megatron_snm.hf.tokenizer_files import hf_tokenizer

    spec, tok = tokenizer if tokenizer is not None else (None, None)
    vocab_size = tok.vocab_size if tok is not None else ckpt.vocab_rows
    eod = tok.eod if tok is not None else None
    gpt = ckpt.gpt_config(vocab_size)
    build = _llama_model if hf_family(gpt) == "llama" else _gpt2_model
    try:
        kind, config, weights = build(ckpt, gpt, vocab_size, eod)
    except ValueError as err:
        raise CheckpointError(f"{ckpt.directory}: {err}") from None
    dtype = dtype or next(iter(weights.values())).dtype
    config.dtype = dtype
    with torch.device("meta"):
        model = kind(config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod,
                                               max_length=gpt.seq_length, do_sample=False)

    # Written under a name of this run's own, published whole; only that directory is ever removed.
    output_dir = output_dir.rstrip("/") or output_dir
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    tmp = temporary_path(output_dir)
    os.mkdir(tmp)
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if config.model_type == "llama":
            _with_rope_theta(os.path.join(tmp, "config.json"))
        if tok is not None:
            hf_tokenizer(spec, tok, model_max_length=gpt.seq_length).save_pretrained(tmp)
        publish_directory(tmp, output_dir)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp)
    return kind.__name__
