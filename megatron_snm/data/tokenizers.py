"""Tokenizers for preprocessing: text in, token ids out.

Four kinds, under Megatron-LM's `--tokenizer-type` names:

    GPT2BPETokenizer        OpenAI's vocab.json + merges.txt, byte-level BPE (tiktoken engine)
    SentencePieceTokenizer  a SentencePiece `.model` (e.g. one from tools/train_tokenizer.py);
                            GPTSentencePieceTokenizer (Megatron-DeepSpeed's Llama scripts) is the
                            same: the model's own pieces, eod = its eos
    HuggingFaceTokenizer    a `tokenizer.json`, or a directory holding one (Hugging Face tokenizers)
    NullTokenizer           no text at all (--mock-data): `--vocab-size N` ids plus the eod, N

Every tokenizer has `vocab_size`, `eod` (the id that ends a document), `tokenize(text)`,
`tokenize_batch(texts)` and `detokenize(ids)`. Calls run single-threaded in the calling
process: `tools/preprocess_data.py` gets its parallelism from worker processes, so a library's
own thread pool would only fight the workers for cores. Training needs only `vocab_size` and
`eod`, and the training loop never imports this module.
"""
from __future__ import annotations

import abc
import contextlib
import json
import os

import numpy as np

from megatron_snm.data.errors import DataError

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer",
                   "NullTokenizer")


class Tokenizer(abc.ABC):
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (before any padding for tensor parallelism)."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """The end-of-document id that `--append-eod` writes after every document."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of `text`, read as plain text: special-token strings in it are not special."""

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """`tokenize` of each text, with one call into the library where it has a batch path."""
        return [self.tokenize(t) for t in texts]

    def tokenize_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        """`tokenize_batch` as integer arrays: what preprocessing writes, without a detour
        through Python ints where the library can hand over an array directly."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.tokenize_batch(texts)]

    @abc.abstractmethod
    def detokenize(self, ids) -> str:
        ...

    @abc.abstractmethod
    def vocabulary(self) -> list[str]:
        """Every token's string, in id order: what data/tokenizer_description.py fingerprints."""


@contextlib.contextmanager
def _reading(path: str, what: str):
    """Any failure to load `path` becomes one DataError naming it (a library's own message
    rarely names the file, and a garbage file must not end in a traceback)."""
    try:
        yield
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a valid {what} ({detail[:200]})") from e


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer named by Megatron's `--tokenizer-type`, checking its files exist first.
    Raises FileNotFoundError for a missing file, DataError (naming it) for one that cannot be
    loaded."""

    def need(value, flag):
        if value is None:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
        if not os.path.exists(value):
            raise FileNotFoundError(f"{flag} {value}: no such file or directory")
        return os.fspath(value)

    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(need(vocab_file, "--vocab-file"), need(merge_file, "--merge-file"))
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return SentencePieceTokenizer(need(tokenizer_model, "--tokenizer-model"))
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(need(tokenizer_model, "--tokenizer-model"))
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"--tokenizer-type NullTokenizer needs --vocab-size N >= 1, got {vocab_size}")
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used to store tokens as text.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map, in byte
    order, to chr(256), chr(257), ...
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# GPT-2's pre-tokenisation regex (tiktoken's r50k_base / gpt2 pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOD = "<|endoftext|>"


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from OpenAI's files, run by tiktoken's Rust BPE.

    tiktoken encodes ~5x faster than a `tokenizers` BPE on the same files, with identical ids
    (tests/test_tokenizers.py checks both). It merges by rank, so the ranks are read from
    merges.txt in order and vocab.json must give every token that same id: true of GPT-2's
    files, and checked here so that other vocabularies fail loudly instead of mis-encoding.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        import tiktoken

        to_byte = {c: b for b, c in bytes_to_unicode().items()}

        def decode(token: str, path: str) -> bytes:
            try:
                return bytes(to_byte[c] for c in token)
            except (KeyError, TypeError) as e:
                raise DataError(f"{path}: token {token!r} is not in GPT-2's byte-level alphabet") from e

        # The single bytes come first, ranked in the order of the characters that stand for them.
        ranks = {bytes([to_byte[c]]): i for i, c in enumerate(sorted(to_byte))}
        with _reading(merge_file, "GPT-2 merges.txt"), open(merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 and line.startswith("#version"):
                    continue
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise DataError(f"{merge_file}:{lineno}: expected two tokens per merge, got {line[:80]!r}")
                ranks[decode(parts[0], merge_file) + decode(parts[1], merge_file)] = len(ranks)
        with _reading(vocab_file, "GPT-2 vocab.json"), open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise DataError(f"{vocab_file}: not a GPT-2 vocab.json (expected one JSON object of token: id)")
        if GPT2_EOD not in vocab:
            raise DataError(f"{vocab_file}: no {GPT2_EOD} token")
        self._tokens = sorted(vocab, key=vocab.__getitem__)  # in id order, <|endoftext|> included
        self._eod = vocab.pop(GPT2_EOD)
        if {decode(t, vocab_file): i for t, i in vocab.items()} != ranks:
            raise DataError(
                f"{vocab_file} and {merge_file} are not a GPT-2 pair: the ids in the vocabulary do not "
                f"follow the merge order (use --tokenizer-type HuggingFaceTokenizer for other BPE files)"
            )
        self._vocab_size = len(ranks) + 1
        self._encoding = tiktoken.Encoding(
            name=f"gpt2:{vocab_file}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOD: self._eod},
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def tokenize_batch_numpy(self, texts: list[str]) -> list[np.ndarray]:
        # disallowed_special=() reads "<|endoftext|>" in the text as plain text, as encode_ordinary does.
        return [self._encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

    def detokenize(self, ids) -> str:
        return self._encoding.decode(list(ids))

    def vocabulary(self) -> list[str]:
        return list(self._tokens)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; the end of document is its `</s>` (eos) piece, as in Megatron."""

    def __init__(self, model_file: str):
        import sentencepiece

        with _reading(model_file, "SentencePiece model"):
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self._eod = self._sp.eos_id()
        if self._eod < 0:
            raise DataError(f"{model_file}: the model has no eos piece to end documents with (train it with eos_id >= 0)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self._sp.decode(list(ids))

    def vocabulary(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]


class NullTokenizer(Tokenizer):
    """Megatron-LM's NullTokenizer: no vocabulary file, ids written as decimal text. `--vocab-size N`
    counts the ids before the end of document, which is id N, so the vocabulary is N + 1."""

    def __init__(self, vocab_size: int):
        self._eod = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def vocabulary(self) -> list[str]:
        return [str(i) for i in range(self.vocab_size)]


# Names models use for their end-of-text token, tried in order when no tokenizer_config.json says.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer from `tokenizer.json` or a directory with one.

    The end of document is the `eos_token` of a `tokenizer_config.json` beside it, else the first
    of the usual end-of-text names in the vocabulary. No special tokens are added around the text
    (no BOS/EOS from a post-processor): documents are delimited by `--append-eod` alone.
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (os.path.dirname(path), path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no tokenizer.json there")
        with _reading(file, "Hugging Face tokenizer.json"):
            self._tok = HFTokenizer.from_file(file)
        self._tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is plain text
        self._eod = self._find_eod(directory, file)

    def _find_eod(self, directory: str, file: str) -> int:
        config = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config):
            with _reading(config, "tokenizer_config.json"), open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):  # an AddedToken written out in full
                eos = eos.get("content")
            if eos is not None:
                eod = self._tok.token_to_id(eos) if isinstance(eos, str) else None
                if eod is None:
                    raise DataError(f"{config}: eos_token {eos!r} is not in {file}")
                return eod
        for name in _EOS_NAMES:
            eod = self._tok.token_to_id(name)
            if eod is not None:
                return eod
        raise DataError(f"{file}: no end-of-text token found (looked for {', '.join(_EOS_NAMES)}); add a tokenizer_config.json with eos_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def vocabulary(self) -> list[str]:
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return sorted(vocab, key=vocab.__getitem__)
