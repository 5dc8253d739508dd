"""A Hugging Face GPT-2 or Llama directory -> our checkpoint layout for a chosen TP/PP (weights only).

    import_from_hf("gpt2/", "ckpt/", tensor_parallel=2, pipeline_parallel=1)
    # then: pretrain_gpt.py --load ckpt/ --save run/ --tensor-model-parallel-size 2 ... (same shape flags)

Reads `GPT2LMHeadModel` directories (safetensors or pytorch_model.bin, sharded or not; never runs
code from the directory) and our own exports (the Embed LN class, the untied Scaled Embed
form). An lm_head of its own (neither the input table nor 1/sqrt(d) of it) becomes
--untie-embeddings-and-output-weights. GPT-2's GELU is the tanh approximation, recorded as `--openai-gelu`.
`LlamaForCausalLM` directories (llama_mapping.py) become our Llama family: rotary positions
(rope_theta -> --rotary-base), RMSNorm (rms_norm_eps), SwiGLU, num_key_value_heads query groups, no
biases, no Embed LN, tied or untied as tie_word_embeddings says, --seq-length and
--max-position-embeddings its max_position_embeddings; rope_scaling, biases and other activations
are refused. The tokenizer files beside the model are copied into CKPT/tokenizer/ and recorded as
the run's tokenizer.
"""
from __future__ import annotations

import json
import math
import os
import shutil

import torch

from megatron_snm.checkpoint.read import CheckpointError
from megatron_snm.checkpoint.write import write_checkpoint
from megatron_snm.config import flags_from_dict, gpt_config_of
from megatron_snm.checkpoint.format import LATEST
from megatron_snm.hf.gpt2_mapping import HF_INPUT_EMBEDDINGS, HF_OUTPUT_LAYER, from_hf_gpt2
from megatron_snm.hf.llama_mapping import from_hf_llama

_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # -> --openai-gelu
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def load(name: str) -> dict:
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)

    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(directory, single)):
            return load(single)
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            weights = {}
            for shard in shards:
                weights.update(load(shard))
            return weights
    raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or their .index.json")


def _canonical(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's names (OpenAI's original files lack the `transformer.` prefix), without
    the attention-mask buffers old files carry."""
    out = {}
    for name, tensor in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name] = tensor
    return out


def _embedding_norm(config, weights: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """Our --embedding-norm, and whether lm_head is a table of its own
    (--untie-embeddings-and-output-weights)."""
    tied = HF_OUTPUT_LAYER not in weights or weights[HF_OUTPUT_LAYER] is weights[HF_INPUT_EMBEDDINGS] or \
        torch.equal(weights[HF_OUTPUT_LAYER], weights[HF_INPUT_EMBEDDINGS])
    if config.model_type == "gpt2_embed_ln":
        return "layernorm", not tied and not config.tie_word_embeddings
    if tied:
        return "none", False
    scaled = weights[HF_OUTPUT_LAYER].float() * math.sqrt(config.n_embd)
    if torch.allclose(scaled, weights[HF_INPUT_EMBEDDINGS].float(), rtol=1e-3, atol=1e-6):
        return "scaled", False
    return "none", True


def _check_supported(config, directory: str) -> None:
    if config.activation_function not in _ACTIVATIONS:
        raise CheckpointError(f"{directory}/config.json: activation_function {config.activation_function!r} is not "
                              f"one of {sorted(_ACTIVATIONS)}")
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, option, False):
            raise CheckpointError(f"{directory}/config.json: {option} is set; our attention has no such variant")
    if not getattr(config, "scale_attn_weights", True):
        raise CheckpointError(f"{directory}/config.json: scale_attn_weights is false; our attention scales by 1/sqrt(d_head)")


def _copy_tokenizer(directory: str, save_dir: str, vocab_size: int) -> dict:
    """Copies the tokenizer files and returns the tokenizer flags that name them (empty: none found)."""
    present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(directory, f))]
    if not present:
        return {}
    target = os.path.abspath(os.path.join(save_dir, "tokenizer"))
    os.makedirs(target, exist_ok=True)
    for f in present:
        shutil.copyfile(os.path.join(directory, f), os.path.join(target, f))
    if "vocab.json" in present and "merges.txt" in present:
        flags = dict(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(target, "vocab.json"),
                     merge_file=os.path.join(target, "merges.txt"))
    elif "tokenizer.json" in present:
        flags = dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=target)
    else:
        return {}
    from megatron_snm.checkpoint.tokenizer import TokenizerSpec

    tokens = TokenizerSpec(**flags).build().vocab_size
    if tokens > vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has {tokens} tokens but the model's vocab_size is {vocab_size}")
    return flags


def _tokenizer_record(args: dict, save_dir: str) -> dict | None:
    """The copied tokenizer's description (checkpoint/tokenizer.py), its files named relative to the
    checkpoint directory, so the imported checkpoint finds them wherever SAVE_DIR is moved."""
    from megatron_snm.checkpoint.tokenizer import run_tokenizer
    from megatron_snm.checkpoint.format import tag_of

    record = run_tokenizer(args)
    if record is None:
        return None
    iter_dir = os.path.join(os.path.abspath(save_dir), tag_of(0))
    return dict(record, files={k: os.path.relpath(args[k], iter_dir) for k in record["files"]})


def _gpt2(directory: str, model_type: str):
    """(config, the model's flags, weights(hf) -> (ours, embedding_norm, untied)) of a GPT-2 directory."""
    from transformers import GPT2Config

    from megatron_snm.hf.modeling_gpt2_embed_ln import GPT2EmbedLNConfig

    # Our Embed LN export is read with this package's config class, never with the directory's code.
    config = (GPT2EmbedLNConfig if model_type == "gpt2_embed_ln" else GPT2Config).from_pretrained(directory)
    _check_supported(config, directory)
    flags = dict(num_layers=config.n_layer, hidden_size=config.n_embd, num_attention_heads=config.n_head,
                 ffn_hidden_size=config.n_inner or 4 * config.n_embd, seq_length=config.n_positions,
                 openai_gelu=_ACTIVATIONS[config.activation_function], layernorm_epsilon=config.layer_norm_epsilon,
                 init_method_std=config.initializer_range, hidden_dropout=config.resid_pdrop,
                 attention_dropout=config.attn_pdrop)

    def weights(hf: dict[str, torch.Tensor]):
        hf = _canonical(hf)
        embedding_norm, untied = _embedding_norm(config, hf)
        ours = from_hf_gpt2(hf, config.n_layer, config.n_head)
        if embedding_norm == "scaled":
            ours["embedding.word_embeddings.weight"] = hf[HF_OUTPUT_LAYER].contiguous()
        if untied:
            ours["output.weight"] = hf[HF_OUTPUT_LAYER].contiguous()
        return ours, embedding_norm, untied
    return config, flags, weights


def _llama(directory: str):
    """The same for a LlamaForCausalLM directory: our Llama-family flags, embedding mode none (no
    Embed LN in Llama), tied as its tie_word_embeddings says."""
    from transformers import LlamaConfig

    config_file = os.path.join(directory, "config.json")
    config = LlamaConfig.from_pretrained(directory)
    rope = dict(config.rope_parameters or {})
    theta = rope.get("rope_theta", 10000.0)
    refusals = [what for what, other in (
        (f"rope_scaling {rope} (only Llama's default rotary positions are implemented here)",
         rope.get("rope_type", "default") != "default"),
        (f"rope_theta {theta} is not an integer (--rotary-base is)", theta != int(theta)),
        (f"hidden_act {config.hidden_act!r} (ours is SwiGLU's silu)", config.hidden_act != "silu"),
        ("attention_bias true (ours has no biases with Llama's other choices)", config.attention_bias),
        ("mlp_bias true (ours has no biases with Llama's other choices)", config.mlp_bias),
    ) if other]
    if refusals:
        raise CheckpointError(f"{config_file}: {refusals[0]}; this Llama cannot be imported")
    groups = config.num_key_value_heads
    flags = dict(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                 num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.intermediate_size,
                 seq_length=config.max_position_embeddings, max_position_embeddings=config.max_position_embeddings,
                 position_embedding_type="rope", rotary_base=int(theta), normalization="RMSNorm", swiglu=True,
                 add_bias_linear=False, group_query_attention=groups != config.num_attention_heads,
                 num_query_groups=groups, kv_channels=config.head_dim, layernorm_epsilon=config.rms_norm_eps,
                 init_method_std=config.initializer_range, hidden_dropout=0.0,
                 attention_dropout=float(config.attention_dropout or 0.0))
    tied = bool(config.tie_word_embeddings)

    def weights(hf: dict[str, torch.Tensor]):
        hf = {k: v for k, v in hf.items() if not k.endswith(".rotary_emb.inv_freq")}  # older files: a buffer
        try:
            ours = from_hf_llama(hf, config.num_hidden_layers, config.num_attention_heads, groups, tied)
        except ValueError as err:
            raise CheckpointError(f"{directory}: {err}") from None
        return ours, "none", not tied
    return config, flags, weights


def import_from_hf(directory: str, save_dir: str, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                   seq_length: int | None = None) -> str:
    """Writes the GPT-2 or Llama in `directory` as our weights-only checkpoint; returns the iter directory.
    seq_length: the --seq-length it records (default: the model's positions, which a Llama may
    count in the hundred thousands)."""
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{config_file}: no such file (give a Hugging Face model directory)")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type in ("gpt2", "gpt2_embed_ln"):
        config, flags, convert = _gpt2(directory, model_type)
    elif model_type == "llama":
        config, flags, convert = _llama(directory)
    else:
        raise CheckpointError(f"{config_file}: model_type {model_type!r}; only GPT-2 (GPT2LMHeadModel), Llama "
                              "(LlamaForCausalLM) and our Embed LN export can be imported")
    if seq_length is not None:
        positions = flags.get("max_position_embeddings", flags["seq_length"])
        if not 1 <= seq_length <= positions:
            raise CheckpointError(f"--seq-length {seq_length} must be in 1..{positions}, the positions of the model in "
                                  f"{config_file}")
        flags = dict(flags, seq_length=seq_length, max_position_embeddings=positions)
    if os.path.exists(os.path.join(save_dir, LATEST)):
        raise CheckpointError(f"--save {save_dir} already holds a checkpoint ({LATEST}); import into a new directory")
    for ours in ("tokenizer", "iter_0000000"):  # what the import writes: never replaced
        if os.path.lexists(os.path.join(save_dir, ours)):
            raise CheckpointError(f"--save {save_dir}: {os.path.join(save_dir, ours)} already exists; import into a "
                                  "new directory")
    layout = dict(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
                  zero_stage=0)
    try:  # the model as the checkpoint will describe it, for this TP size (flags named where it cannot be)
        gpt_config_of(flags_from_dict(dict(flags, **layout)), config.vocab_size, tensor_parallel).validate()
    except ValueError as err:
        raise CheckpointError(f"{directory}: {err}") from None
    num_layers = flags["num_layers"]
    if pipeline_parallel > num_layers:
        raise CheckpointError(f"--pipeline-model-parallel-size {pipeline_parallel} exceeds the model's {num_layers} layers")
    weights, embedding_norm, untied = convert(_read_hf_weights(directory))
    dtype = weights["embedding.word_embeddings.weight"].dtype
    args = dict(flags, **layout, embedding_norm=embedding_norm, untie_embeddings_and_output_weights=untied,
                bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                **_copy_tokenizer(directory, save_dir, config.vocab_size))
    shape = {k: flags[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                   "seq_length", "max_position_embeddings") if k in flags}
    metadata = dict(args=flags_from_dict(args).as_dict(), imported_from=os.path.abspath(directory),
                    model_shape=dict(shape, embedding_norm=embedding_norm, untie_embeddings_and_output_weights=untied),
                    tokenizer=_tokenizer_record(args, save_dir))
    return write_checkpoint(save_dir, weights, metadata, tensor_parallel, pipeline_parallel, vocab_size=config.vocab_size)
