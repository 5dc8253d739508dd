"""The paper's model sizes (`--model-size`). Shapes only; everything else comes from the flags.

- 1.7b: the paper's own configuration (24 layers, hidden 2304, 24 heads, sequence 2048).
- 350m: GPT-3 "Medium" from Brown et al. 2020, Table 2.1 (24 layers, d 1024, 16 heads).
- llama-1b: Llama 3.2 1B's shape (the architecture comes from its flags, examples/pretrain_llama_1b.sh).
- 13b: GPT-3 13B / Megatron-LM's 13B (40 layers, 40 heads, head dim 128 -> d 5120; GPT-3's table
  prints d_model 5140, which is not divisible by its 40 heads, so we take Megatron's 5120).
"""
MODEL_PRESETS = {
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048),
    "1.7b": dict(num_layers=24, hidden_size=2304, num_attention_heads=24, seq_length=2048),
    "13b": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, seq_length=2048),
    # Llama 3.2 1B's shape (16 layers, d 2048, 32 heads) at the paper's sequence length; its
    # architecture flags (8 key/value heads, FFN 8192, rotary base 500000, RMSNorm, SwiGLU, no
    # biases) are the example's (examples/pretrain_llama_1b.sh).
    "llama-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, seq_length=2048),
}


def architecture(name: str, num_attention_heads: int) -> dict:
    """Model-config fields of an architecture family for the study tools: "gpt2" (the defaults:
    learned positions, LayerNorm, GELU, biases) or "llama" (rotary positions, RMSNorm, SwiGLU, a
    key/value head per two query heads, no biases)."""
    if name == "gpt2":
        return {}
    if name == "llama":
        return dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                    num_query_groups=max(1, num_attention_heads // 2), add_bias_linear=False)
    raise ValueError(f"unknown architecture {name!r} (gpt2 or llama)")


ARCHITECTURES = ("gpt2", "llama")


def architecture_flags(name: str, num_attention_heads: int) -> list[str]:
    """The same as pretrain_gpt.py flags."""
    fields = architecture(name, num_attention_heads)
    flags = []
    for field, value in fields.items():
        if field == "num_query_groups":
            flags += ["--group-query-attention", "--num-query-groups", str(value)]
        elif field == "add_bias_linear":
            flags += [] if value else ["--disable-bias-linear"]
        elif value is True:
            flags.append("--" + field.replace("_", "-"))
        else:
            flags += ["--" + field.replace("_", "-"), str(value)]
    return flags
