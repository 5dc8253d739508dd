"""tools/train_tokenizer.py: an existing tokenizer is replaced only with --overwrite (as preprocessing
and merging treat a dataset), and input with no text (empty, binary, not UTF-8) is named in one line
instead of SentencePiece's `INTERNAL: src/trainer_interface.cc(467)`."""
import gzip

import pytest
import sentencepiece

from tests.conftest import SAMPLE_DIR, load_tool

TRAIN = SAMPLE_DIR / "c4-train.00000-of-00001.json.gz"


@pytest.fixture
def tool():
    return load_tool("train_tokenizer")


def pieces(path):
    return sentencepiece.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def test_an_existing_tokenizer_is_replaced_only_with_overwrite(tool, tmp_path, capsys):
    prefix = str(tmp_path / "sp")
    assert tool.main(["--input", str(TRAIN), "--model-prefix", prefix, "--vocab-size", "600", "--workers", "1"]) == 0
    before = (tmp_path / "sp.model").read_bytes()
    capsys.readouterr()
    assert tool.main(["--input", str(TRAIN), "--model-prefix", prefix, "--vocab-size", "400", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}.model already exists; pass --overwrite" in err and err.count("\n") == 1
    assert (tmp_path / "sp.model").read_bytes() == before and pieces(tmp_path / "sp.model") == 600
    assert tool.main(["--input", str(TRAIN), "--model-prefix", prefix, "--vocab-size", "400", "--workers", "1",
                      "--overwrite"]) == 0
    assert pieces(tmp_path / "sp.model") == 400
    # SentencePiece's own refusals are one line without its source position.
    capsys.readouterr()
    assert tool.main(["--input", str(TRAIN), "--model-prefix", str(tmp_path / "small"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert "refused --vocab-size 300 on this input: Vocabulary size is smaller than required_chars" in err
    assert "INTERNAL" not in err and err.count("\n") == 1
    (tmp_path / "file").write_text("the user's")  # a --model-prefix whose directory is a file
    assert tool.main(["--input", str(TRAIN), "--model-prefix", str(tmp_path / "file" / "sp")]) == 2
    err = capsys.readouterr().err
    assert "cannot create" in err and err.count("\n") == 1 and (tmp_path / "file").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "sp.model", "sp.vocab"]  # no temporary left


@pytest.mark.parametrize("content, reason", [
    (b"", "no lines"),
    (bytes(range(256)) * 40, "non_utf8"),
    (b'{"text": "caf\xe9"}\n', "non_utf8: 1"),
    (b'{"title": "no text key"}\n', "missing_key: 1"),
])
def test_input_without_text_is_named_in_one_line(tool, tmp_path, capsys, content, reason):
    data = tmp_path / "in.jsonl.gz"
    with gzip.open(data, "wb") as f:
        f.write(content)
    code = tool.main(["--input", str(data), "--model-prefix", str(tmp_path / "sp"), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert code == 2 and f"--input {data}: no text under --json-keys text" in err and reason in err, err
    assert err.count("\n") == 1 and "INTERNAL" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl.gz"]
