"""Hugging Face transformers interchange: the GPT-2 weight mapping (gpt2_mapping.py, one table),
export (export.py), import (import_hf.py), tokenizers (tokenizer_files.py) and the Embed LN model
class shipped with exports (modeling_gpt2_embed_ln.py, loaded with trust_remote_code=True)."""
