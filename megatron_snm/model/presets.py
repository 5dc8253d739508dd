"""The paper's model sizes (`--model-size`). Shapes only; everything else comes from the flags.

- 1.7b: the paper's own configuration (24 layers, hidden 2304, 24 heads, sequence 2048).
- 350m: GPT-3 "Medium" from Brown et al. 2020, Table 2.1 (24 layers, d 1024, 16 heads).
- 13b: GPT-3 13B / Megatron-LM's 13B (40 layers, 40 heads, head dim 128 -> d 5120; GPT-3's table
  prints d_model 5140, which is not divisible by its 40 heads, so we take Megatron's 5120).
"""
MODEL_PRESETS = {
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048),
    "1.7b": dict(num_layers=24, hidden_size=2304, num_attention_heads=24, seq_length=2048),
    "13b": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, seq_length=2048),
}
