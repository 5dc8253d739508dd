"""Evaluation and generation on any TP x PP x DP layout: the model built per rank (model.py), the
KV cache (kv_cache.py), next-token choice (sampling.py), the generation loop (generate.py),
rolling-window perplexity and last-word accuracy (evaluate.py), and the tools' shared flags (cli.py)."""
