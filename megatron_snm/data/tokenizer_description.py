"""Which tokenizer made a dataset: `PREFIX.tokenizer.json` beside `PREFIX.bin` / `PREFIX.idx`.

Megatron's `.bin`/`.idx` pair records token ids and nothing of the tokenizer that made them, so
data tokenized with one tokenizer trains (or is evaluated) under another without a word. The pair
stays byte for byte Megatron's; tools/preprocess_data.py and tools/merge_datasets.py publish a
third, small file with it (in the same atomic set, the `.idx` last):

    {"tokenizer_type": "SentencePieceTokenizer", "vocab_size": 2000, "eod": 2,
     "vocabulary_sha256": "5d0c...", "source": "tokenizer.model"}

`vocabulary_sha256` hashes every token's string in id order (Tokenizer.vocabulary()), so the same
vocabulary read from another path, or the same GPT-2 vocabulary through GPT2BPETokenizer or a
tokenizer.json, matches; another vocabulary of the same size does not. Training, merging and the
tools compare descriptions (`same_tokenizer`) and refuse a mismatch naming the file and both
tokenizers. A dataset made elsewhere (Megatron-LM) has no description: `data/vocabulary_check.undescribed_warning` looks
at its largest token id instead, which for data of a much smaller vocabulary lies far below the
run's vocabulary size. Checkpoints record the same description (checkpoint/tokenizer.py).
"""
from __future__ import annotations

import hashlib
import json
import os


from megatron_snm.data.errors import DataError

SUFFIX = ".tokenizer.json"
_FIELDS = ("tokenizer_type", "vocab_size", "eod", "vocabulary_sha256")
# Without a description, a dataset whose largest id is below this fraction of the vocabulary was
# most likely made with a smaller one (GPT-2 text uses ids near 50,000 within a few documents).


def description_path(prefix: str) -> str:
    return prefix + SUFFIX


def describe(tokenizer, source: str | None = None) -> dict:
    """The description of `tokenizer` (a data/tokenizers.Tokenizer); `source` is the file it was
    read from, kept for the messages only."""
    vocabulary = json.dumps(tokenizer.vocabulary(), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return dict(tokenizer_type=type(tokenizer).__name__, vocab_size=int(tokenizer.vocab_size), eod=int(tokenizer.eod),
                vocabulary_sha256=hashlib.sha256(vocabulary).hexdigest(),
                source=os.path.basename(os.path.normpath(source)) if source else None)


def label(description: dict) -> str:
    """One tokenizer in a message: its type, file, size and the start of its fingerprint."""
    source = f" {description['source']}" if description.get("source") else ""
    return (f"{description['tokenizer_type']}{source} ({description['vocab_size']:,} tokens, vocabulary "
            f"{description['vocabulary_sha256'][:12]})")


def same_tokenizer(a: dict, b: dict) -> bool:
    return a["vocabulary_sha256"] == b["vocabulary_sha256"] and a["eod"] == b["eod"]


def to_json(description: dict) -> str:
    return json.dumps(description, indent=1) + "\n"


def read_description(prefix: str) -> dict | None:
    """The description beside dataset `prefix` (None: it has none). DataError naming the file for
    one that cannot be read."""
    path = description_path(prefix)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
        if not isinstance(description, dict) or any(k not in description for k in _FIELDS):
            raise ValueError(f"expected an object with {', '.join(_FIELDS)}")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable tokenizer description ({err}); remove it, or preprocess again") \
            from None
    return description


def check_dataset(prefix: str, expected: dict, whose: str) -> None:
    """Raises DataError if dataset `prefix` was made with another tokenizer than `expected`
    (`whose`: what `expected` is, e.g. "this run's tokenizer")."""
    found = read_description(prefix)
    if found is not None and not same_tokenizer(found, expected):
        raise DataError(f"{description_path(prefix)}: the dataset {prefix} was made with {label(found)}, but "
                        f"{whose} is {label(expected)}; preprocess it again with that tokenizer, or give the "
                        "tokenizer it was made with")
