"""A dataset knows its tokenizer (issue 21): preprocessing writes PREFIX.tokenizer.json beside the
Megatron .bin/.idx pair; training, merging and the tools refuse data or checkpoints of another
tokenizer by name; a Megatron-made dataset without a description whose ids look like a smaller
vocabulary's is warned about; a checkpoint carries a copy of its tokenizer and works from any
directory, moved or not."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_snm.data.errors import DataError
from megatron_snm.data.tokenizer_description import describe, description_path, read_description, same_tokenizer
from megatron_snm.data.tokenizers import build_tokenizer
from tests.conftest import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def tool(*argv, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([PY, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory, sample_dir):
    """Two SentencePiece tokenizers of the same size trained on different text, and the sample
    preprocessed with each."""
    root = tmp_path_factory.mktemp("dataset_tokenizer")
    for name, split in (("tok_a", "train"), ("tok_b", "validation")):
        source = str(sample_dir / f"c4-{split}.00000-of-00001.json.gz")
        assert tool("tools/train_tokenizer.py", "--input", source, "--model-prefix", str(root / name),
                    "--vocab-size", "400").returncode == 0
        proc = tool("tools/preprocess_data.py", "--input", str(sample_dir / "c4-train.00000-of-00001.json.gz"),
                    "--output-prefix", str(root / f"data_{name}"), "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", str(root / f"{name}.model"), "--append-eod")
        assert proc.returncode == 0, proc.stderr
    return root


def sp(path):
    return build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(path))


def test_preprocessing_describes_the_tokenizer_beside_a_megatron_pair(made):
    prefix = str(made / "data_tok_a_text_document")
    description = read_description(prefix)
    assert description == describe(sp(made / "tok_a.model"), "tok_a.model")
    assert description["tokenizer_type"] == "SentencePieceTokenizer" and description["vocab_size"] == 400
    # Another tokenizer of the same size is another vocabulary; the same one read from another path is not.
    assert not same_tokenizer(description, describe(sp(made / "tok_b.model")))
    shutil.copy(made / "tok_a.model", made / "copy_of_a.model")
    assert same_tokenizer(description, describe(sp(made / "copy_of_a.model")))
    assert sorted(os.listdir(made)) == sorted(set(os.listdir(made)))  # no temporary left beside them
    assert not [n for n in os.listdir(made) if ".tmp-" in n]


def test_gpt2_vocabulary_matches_through_either_tokenizer_type(gpt2_files, tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers.models import BPE

    vocab, merges = gpt2_files
    ours = build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges))
    hf = HF(BPE.from_file(str(vocab), str(merges)))
    hf.save(str(tmp_path / "tokenizer.json"))
    theirs = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    assert same_tokenizer(describe(ours), describe(theirs))


def test_training_refuses_data_of_another_tokenizer(made, gpt2_files):
    pretrain = __import__("pretrain_gpt")
    prefix = str(made / "data_tok_a_text_document")
    with pytest.raises(DataError) as err:
        pretrain.check_datasets_tokenizer([prefix], sp(made / "tok_b.model"), str(made / "tok_b.model"))
    message = str(err.value)
    assert description_path(prefix) in message and "tok_a.model" in message and "tok_b.model" in message
    # The whole entry point: one line, exit status 2, before anything starts.
    vocab, merges = gpt2_files
    proc = tool("pretrain_gpt.py", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
                "--data-path", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(vocab),
                "--merge-file", str(merges))
    assert proc.returncode == 2 and "GPT2BPETokenizer vocab.json (50,257 tokens" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_dataset_without_description_far_below_the_vocabulary_is_warned_about(made, gpt2_files, capsys):
    pretrain = __import__("pretrain_gpt")
    bare = made / "bare"
    bare.mkdir()
    for suffix in (".bin", ".idx"):  # as Megatron-LM writes it: the pair alone
        shutil.copy(made / f"data_tok_a_text_document{suffix}", bare / f"megatron{suffix}")
    prefix = str(bare / "megatron")
    vocab, merges = gpt2_files
    pretrain.check_datasets_tokenizer([prefix], sp(made / "tok_b.model"), None)  # 400 ids: plausible, no word
    assert capsys.readouterr().err == ""
    pretrain.check_datasets_tokenizer([prefix], build_tokenizer("GPT2BPETokenizer", str(vocab), str(merges)), None)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and prefix in warning[0] and "largest token id is 399" in warning[0], warning


def test_merge_refuses_datasets_of_two_tokenizers(made, capsys):
    merge = load_tool("merge_datasets")
    a, b = str(made / "data_tok_a_text_document"), str(made / "data_tok_b_text_document")
    out = str(made / "merged")
    assert merge.main(["--input", a, b, "--output-prefix", out]) == 2
    err = capsys.readouterr().err
    assert description_path(a) in err and description_path(b) in err and "two tokenizers" in err
    assert not [n for n in os.listdir(made) if n.startswith("merged")]
    assert merge.main(["--input", a, a, "--output-prefix", out]) == 0
    assert read_description(out) == read_description(a)


def train(made, cwd, save, tokenizer_model, *extra, data="data_tok_a"):
    """A 2-iteration single-process run, every path relative to `cwd` as a user would type it."""
    return tool(os.path.join(REPO, "pretrain_gpt.py"), "--num-layers", "1", "--hidden-size", "16",
                "--num-attention-heads", "2", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size",
                "2", "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0", "--data-path",
                os.path.relpath(made / f"{data}_text_document", cwd), "--split", "100,0,0",
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
                "--save", save, *extra, cwd=cwd)


def test_a_checkpoint_carries_its_tokenizer_and_refuses_another(made, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(made / "tok_a.model", work / "tok.model")
    proc = train(made, work, "ckpt", "tok.model")  # the demo's way: paths relative to where it ran
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((work / "ckpt" / "iter_0000002" / "megatron_snm.json").read_text())
    assert meta["tokenizer"]["files"] == {"tokenizer_model": "tokenizer/tok.model"}
    assert (work / "ckpt" / "iter_0000002" / "tokenizer" / "tok.model").read_bytes() == (work / "tok.model").read_bytes()
    # Moved, and used from another directory: its own copy of the tokenizer, nothing relative to the cwd.
    shutil.move(str(work / "ckpt"), str(tmp_path / "moved"))
    (work / "tok.model").write_bytes((made / "tok_b.model").read_bytes())  # what the cwd now holds must not matter
    for cwd in (tmp_path, work):
        gen = tool(os.path.join(REPO, "tools/generate.py"), "--load", str(tmp_path / "moved"), "--prompt", "The",
                   "--max-new-tokens", "3", cwd=cwd)
        assert gen.returncode == 0, gen.stderr[-2000:]
    # A tokenizer of the same size given to a tool, or to a resumed run, is refused by name.
    ev = tool(os.path.join(REPO, "tools/evaluate.py"), "--load", str(tmp_path / "moved"), "--data-path",
              str(made / "data_tok_a_text_document"), "--tokenizer-type", "SentencePieceTokenizer",
              "--tokenizer-model", str(made / "tok_b.model"), cwd=tmp_path)
    assert ev.returncode == 2 and "tok_b.model" in ev.stderr and "tok.model" in ev.stderr, ev.stderr[-2000:]
    assert "is not the one" in ev.stderr
    resumed = train(made, work, str(tmp_path / "again"), str(made / "tok_b.model"), "--load", str(tmp_path / "moved"),
                    "--train-iters", "3", data="data_tok_b")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    line, = [x for x in resumed.stderr.splitlines() if x.startswith("pretrain_gpt.py: error:")]
    assert "was trained with SentencePieceTokenizer tok.model" in line and "tok_b.model" in line


def test_evaluate_refuses_a_dataset_of_another_tokenizer(made, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    assert train(made, work, "ckpt", str(made / "tok_a.model")).returncode == 0
    ev = tool(os.path.join(REPO, "tools/evaluate.py"), "--load", str(work / "ckpt"), "--data-path",
              str(made / "data_tok_b_text_document"), cwd=work)
    assert ev.returncode == 2 and description_path(str(made / "data_tok_b_text_document")) in ev.stderr, \
        ev.stderr[-2000:]
    ok = tool(os.path.join(REPO, "tools/evaluate.py"), "--load", str(work / "ckpt"), "--data-path",
              str(made / "data_tok_a_text_document"), "--max-tokens", "64", "--split-part", "all", cwd=work)
    assert ok.returncode == 0, ok.stderr[-2000:]
