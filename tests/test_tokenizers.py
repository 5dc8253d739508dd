"""Tokenizers give the reference ids: GPT-2 against tiktoken's own `gpt2` encoding and against
Hugging Face `tokenizers` reading the same files; SentencePiece and tokenizer.json wrappers
against their libraries."""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_snm.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

from conftest import REPO

# Strings where byte-level BPE implementations tend to differ: contractions, runs of spaces and
# newlines, digits, non-Latin scripts, emoji, a special-token string that must stay plain text.
TRICKY = [
    "", " ", "Hello world", "  two  spaces\n\n\nand newlines \t tab", "I'm we'll they've it's 'quoted'",
    "12345 3.14159 1,000,000", "Ünïcödé façade naïve — “quotes”", "日本語のテキスト", "😀👍🏽 emoji",
    "a<|endoftext|>b", "trailing space ", "\u00a0nbsp\u2009thin",
]


def sample_texts(sample_dir):
    texts = []
    for name in ("c4-train.00000-of-00001.json.gz", "c4-validation.00000-of-00001.json.gz"):
        with gzip.open(sample_dir / name, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    return texts


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return build_tokenizer("GPT2BPETokenizer", *gpt2_files)


def tiktoken_gpt2(gpt2_files, cache_dir):
    """tiktoken's registered `gpt2` encoding, fed the files offline through its cache (cache names
    are the sha1 of the URLs it would download; it checks the files' sha256 itself)."""
    import tiktoken

    vocab, merges = gpt2_files
    shutil.copy(merges, cache_dir / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")  # .../vocab.bpe
    shutil.copy(vocab, cache_dir / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")  # .../encoder.json
    return tiktoken.get_encoding("gpt2")


def test_gpt2_matches_tiktoken_reference(gpt2, gpt2_files, sample_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken_gpt2(gpt2_files, tmp_path)
    texts = sample_texts(sample_dir) + TRICKY
    assert gpt2.tokenize_batch(texts) == [reference.encode_ordinary(t) for t in texts]
    assert (gpt2.vocab_size, gpt2.eod) == (reference.n_vocab, reference.eot_token) == (50257, 50256)


def test_gpt2_matches_huggingface_bpe(gpt2, gpt2_files, sample_dir):
    """A second, independent BPE implementation reading vocab.json + merges.txt."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(*map(str, gpt2_files)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = sample_texts(sample_dir)[-3:] + TRICKY
    assert [gpt2.tokenize(t) for t in texts] == [hf.encode(t, add_special_tokens=False).ids for t in texts]


def test_gpt2_round_trip(gpt2, sample_dir):
    texts = sample_texts(sample_dir)[:3] + TRICKY
    assert [gpt2.detokenize(ids) for ids in gpt2.tokenize_batch(texts)] == texts
    assert gpt2.tokenize("a<|endoftext|>b") != [64, gpt2.eod, 65]  # plain text, not the special id


def test_gpt2_rejects_vocab_not_in_merge_order(gpt2_files, tmp_path):
    vocab = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    vocab["the"], vocab["ing"] = vocab["ing"], vocab["the"]  # ids no longer follow merge priority
    bad = tmp_path / "vocab.json"
    bad.write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="not a GPT-2 pair"):
        GPT2BPETokenizer(str(bad), str(gpt2_files[1]))


def test_build_tokenizer_checks_configuration(gpt2_files, tmp_path):
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0])
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=tmp_path / "nope.model")
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("BertWordPieceLowerCase")


@pytest.fixture(scope="module")
def sp_model(sample_dir, tmp_path_factory):
    """A SentencePiece model trained on the bundled sample by tools/train_tokenizer.py."""
    prefix = tmp_path_factory.mktemp("sp") / "sp"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input", str(sample_dir),
         "--model-prefix", str(prefix), "--vocab-size", "4000", "--workers", "2"],
        check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    return str(prefix) + ".model"


def test_sentencepiece_trained_on_sample(sp_model, sample_dir):
    import sentencepiece

    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    reference = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    texts = sample_texts(sample_dir) + TRICKY
    ids = tok.tokenize_batch(texts)
    assert ids == [reference.encode(t) for t in texts] == [tok.tokenize(t) for t in texts]
    assert (tok.vocab_size, tok.eod) == (4000, reference.piece_to_id("</s>"))
    # Lossless model: newlines, runs of spaces and unseen characters (bytes) all survive.
    assert [tok.detokenize(i) for i in ids] == texts


def test_huggingface_tokenizer_json(gpt2, gpt2_files, sample_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(*map(str, gpt2_files)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])  # special, yet plain text when a document contains it
    hf.save(str(tmp_path / "tokenizer.json"))

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tmp_path / "tokenizer.json")
    texts = sample_texts(sample_dir)[-2:] + TRICKY
    assert tok.tokenize_batch(texts) == gpt2.tokenize_batch(texts)
    assert [tok.detokenize(tok.tokenize(t)) for t in texts] == texts
    assert (tok.vocab_size, tok.eod) == (50257, 50256)  # eod found by its usual name

    # A directory with a tokenizer_config.json: its eos_token names the end of document.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "!"}))
    assert isinstance(tok := build_tokenizer("HuggingFaceTokenizer", tokenizer_model=tmp_path), HuggingFaceTokenizer)
    assert tok.eod == gpt2.tokenize("!")[0]


def test_sentencepiece_without_eos_is_rejected(sample_dir, tmp_path):
    import sentencepiece

    texts = sample_texts(sample_dir)[:2]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.splitlines() if line.strip()]),
        model_prefix=str(tmp_path / "noeos"), vocab_size=300, eos_id=-1, minloglevel=2,
    )
    with pytest.raises(ValueError, match="no eos piece"):
        SentencePieceTokenizer(str(tmp_path / "noeos.model"))


@pytest.mark.parametrize("kind, content", [
    ("sentencepiece", b"\x08\x96garbage" * 200),
    ("tokenizer.json", b'{"version": "1.0", "model": '),
    ("tokenizer.json", b"[1, 2, 3]"),
    ("vocab.json", b"\xff\xfe not utf-8"),
    ("vocab.json", b'["a", "list"]'),
    ("merges.txt", b"#version: 0.2\nonly-one-token-per-line\n"),
    ("merges.txt", bytes(range(256))),
    ("tokenizer_config.json", b"{not json"),
])
def test_a_garbage_tokenizer_file_is_a_data_error_naming_it(gpt2_files, tmp_path, kind, content):
    """What pretrain_gpt.py and preprocess_data.py call: one clear error, never a library traceback."""
    from megatron_snm.data.errors import DataError

    garbage = tmp_path / kind
    garbage.write_bytes(content)
    if kind == "tokenizer_config.json":  # beside a good tokenizer.json
        from tokenizers import Tokenizer, models

        Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    args = {
        "sentencepiece": ("SentencePieceTokenizer", None, None, garbage),
        "tokenizer.json": ("HuggingFaceTokenizer", None, None, garbage),
        "tokenizer_config.json": ("HuggingFaceTokenizer", None, None, tmp_path),
        "vocab.json": ("GPT2BPETokenizer", garbage, gpt2_files[1], None),
        "merges.txt": ("GPT2BPETokenizer", gpt2_files[0], garbage, None),
    }[kind]
    with pytest.raises(DataError) as err:
        build_tokenizer(*args)
    assert str(err.value).startswith(f"{garbage}"), str(err.value)
    assert "\n" not in str(err.value)
