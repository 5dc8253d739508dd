"""Hugging Face transformers interchange: the GPT-2 and Llama weight mappings (gpt2_mapping.py,
llama_mapping.py, one table each), export (export.py: GPT-2 or Llama from the checkpoint's
architecture), import (import_hf.py), tokenizers (tokenizer_files.py) and the GPT-2 Embed LN model
class shipped with exports (modeling_gpt2_embed_ln.py, loaded with trust_remote_code=True)."""
