"""Our tokenizers as Hugging Face `transformers` tokenizers (for `AutoTokenizer.from_pretrained`).

    GPT2BPETokenizer        GPT2TokenizerFast over the same vocab.json / merges.txt
    SentencePieceTokenizer  a `tokenizers` BPE built from the .model's pieces and merges, with
                            SentencePiece's own text handling (a "▁" prefix, spaces as "▁", byte
                            fallback), so the ids equal sentencepiece's
    HuggingFaceTokenizer    its tokenizer.json as it is

The end-of-document token is the tokenizer's EOS (and BOS, and padding, as for GPT-2). One
difference remains, Hugging Face's convention: the text "</s>" or "<|endoftext|>" inside a document
is read as the special token, where our preprocessing reads it as plain text.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from megatron_snm.checkpoint.tokenizer import TokenizerSpec
from megatron_snm.data.tokenizers import Tokenizer


def _sentencepiece_backend(model_file: str):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    pieces = SentencePieceExtractor(model_file).extract(models.BPE)
    if pieces.get("_spm_precompiled_charsmap"):
        raise ValueError(f"{model_file}: a SentencePiece model with a normalisation rule; only identity "
                         "normalisation (tools/train_tokenizer.py's) converts exactly")
    backend = HFTokenizer(models.BPE(vocab=pieces["vocab"], merges=pieces["merges"], fuse_unk=True,
                                     byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return backend


def hf_tokenizer(spec: TokenizerSpec, tokenizer: Tokenizer, model_max_length: int):
    """A PreTrainedTokenizerFast giving the same ids as `tokenizer`, with EOS = its end of document."""
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    if spec.tokenizer_type == "GPT2BPETokenizer":
        with tempfile.TemporaryDirectory() as tmp:  # from_pretrained reads the files under their usual names
            shutil.copyfile(spec.vocab_file, os.path.join(tmp, "vocab.json"))
            shutil.copyfile(spec.merge_file, os.path.join(tmp, "merges.txt"))
            hf = GPT2TokenizerFast.from_pretrained(tmp, model_max_length=model_max_length)
    elif spec.tokenizer_type == "SentencePieceTokenizer":
        hf = PreTrainedTokenizerFast(tokenizer_object=_sentencepiece_backend(spec.tokenizer_model),
                                     model_max_length=model_max_length, unk_token="<unk>")
    elif spec.tokenizer_type == "HuggingFaceTokenizer":
        path = spec.tokenizer_model
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        hf = PreTrainedTokenizerFast(tokenizer_file=file, model_max_length=model_max_length)
    else:
        raise ValueError(f"--tokenizer-type {spec.tokenizer_type}: no Hugging Face equivalent")
    eod = hf.convert_ids_to_tokens(tokenizer.eod)
    hf.eos_token = hf.bos_token = hf.pad_token = eod
    return hf
