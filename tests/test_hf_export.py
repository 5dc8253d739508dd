"""Export to Hugging Face transformers: checkpoints of every embedding mode, saved by training
under TP=2, PP=2 and ZeRO-3, are read back into the trained model (its own test loss), and the
exported model's logits equal ours (fp32, CPU, max abs difference <= 1e-4); the tokenizer gives
our ids; sharded safetensors load; bad input is refused in one line."""
import json
import os

import pytest
import torch

from megatron_snm.checkpoint.read import read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.hf.export import export_to_hf
from megatron_snm.model.gpt import GPTModel, gpt_loss
from tests.conftest import load_tool
from tests.hf_support import BASE, CONFIGS, TOKENIZER_VOCAB, UNTIED, train_runs

ATOL = 1e-4


def our_logits(ckpt, tokens):
    model = GPTModel(ckpt.gpt_config())  # the table's rows, padding included, as in training
    model.load_state_dict(ckpt.weights)
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.fixture(scope="module")
def exported(trained_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    out = {}
    for name, trained in trained_checkpoints.items():
        ckpt = read_checkpoint(trained.save_dir)
        export_to_hf(ckpt, str(root / name), checkpoint_tokenizer(ckpt))
        out[name] = (ckpt, str(root / name))
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_read_checkpoint_is_the_trained_model(trained_checkpoints, exported, name, one_thread):
    trained, (ckpt, _) = trained_checkpoints[name], exported[name]
    tokens = torch.from_numpy(trained.test_samples)
    loss = gpt_loss(our_logits(ckpt, tokens[:, :-1]), tokens[:, 1:]).item()
    assert loss == pytest.approx(trained.test_loss, rel=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_logits_equal_ours(trained_checkpoints, exported, name, one_thread):
    from transformers import AutoModelForCausalLM

    ckpt, directory = exported[name]
    mode = ckpt.gpt_config().embedding_norm
    hf = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=mode == "layernorm").eval()
    assert type(hf).__name__ == ("GPT2EmbedLNLMHeadModel" if mode == "layernorm" else "GPT2LMHeadModel")
    assert hf.config.tie_word_embeddings == (mode != "scaled" and name not in UNTIED)
    assert hf.config.n_positions == ckpt.gpt_config().max_position_embeddings
    assert hf.config.vocab_size == TOKENIZER_VOCAB  # the padding rows are cut
    tokens = torch.from_numpy(trained_checkpoints[name].test_samples)[:, :-1]
    with torch.no_grad():
        theirs = hf(tokens).logits
    ours = our_logits(ckpt, tokens)[..., :TOKENIZER_VOCAB]
    assert (theirs - ours).abs().max().item() <= ATOL


def test_embed_ln_model_needs_trust_remote_code(exported):
    from transformers import AutoModelForCausalLM

    directory = exported["tp2-layernorm"][1]
    assert sorted(f for f in os.listdir(directory) if f.endswith(".py")) == ["modeling_gpt2_embed_ln.py"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False)


def test_tokenizer_and_generation_config(exported, sample_dir):
    import gzip

    from transformers import AutoTokenizer, GenerationConfig

    ckpt, directory = exported["pp2-scaled"]
    _, ours = checkpoint_tokenizer(ckpt)
    theirs = AutoTokenizer.from_pretrained(directory)
    with gzip.open(sample_dir / "c4-validation.00000-of-00001.json.gz", "rt") as f:
        text = json.loads(f.readline())["text"]
    for piece in [text[:3000], " leading space", "  two  spaces\n\n\ttab 12345 émoji 🙂", "x"]:
        assert theirs.encode(piece, add_special_tokens=False) == ours.tokenize(piece)
        assert theirs.decode(ours.tokenize(piece)) == piece
    assert theirs.eos_token_id == ours.eod
    generation = GenerationConfig.from_pretrained(directory)
    assert generation.eos_token_id == ours.eod and generation.max_length == 16


def test_sharded_safetensors(exported, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM

    ckpt, directory = exported["tp2-none"]
    export_to_hf(ckpt, str(tmp_path / "sharded"), checkpoint_tokenizer(ckpt), max_shard_size="40KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    single = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_convert_refuses_bad_input(trained_checkpoints, tmp_path, capsys):
    from tests.hf_support import train_tokenizer

    convert = load_tool("convert_checkpoint")
    assert convert.main(["--to", "hf", "--load", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'missing'}: no such checkpoint directory" in capsys.readouterr().err

    other = train_tokenizer(str(tmp_path / "sp400"), vocab_size=400)  # not the run's vocabulary
    argv = ["--to", "hf", "--load", trained_checkpoints["tp2-none"].save_dir, "--output", str(tmp_path / "o"),
            "--tokenizer-model", other]
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert "not the tokenizer this model was trained with" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("name", sorted(UNTIED))
def test_untied_long_position_checkpoint_reshards_to_another_layout(trained_checkpoints, name, tmp_path, one_thread):
    """Weights-only resharding of an untied checkpoint with more positions than --seq-length: written
    for another TP x PP (PP=2 files included), read back equal, and trained from by that layout."""
    from megatron_snm.checkpoint.write import write_checkpoint

    ckpt = read_checkpoint(trained_checkpoints[name].save_dir)
    assert ckpt.weights["embedding.position_embeddings"].shape[0] == 24
    tp, pp = (1, 2) if name.startswith("tp2") else (2, 1)
    written = write_checkpoint(str(tmp_path / "moved"), dict(ckpt.weights), ckpt.metadata, tp, pp,
                               vocab_size=TOKENIZER_VOCAB)
    back = read_checkpoint(written)
    assert back.weights.keys() == ckpt.weights.keys()
    for key, tensor in ckpt.weights.items():
        rows = min(tensor.shape[0], back.weights[key].shape[0])  # the vocabulary re-padded for TP
        assert torch.equal(back.weights[key][:rows], tensor[:rows]), key
    # Training from it under the new layout: with a learning rate of 0 the test loss is the saved model's.
    model_flags = CONFIGS[name][2:]  # after the parallel size
    tokenizer = ckpt.metadata["args"]["tokenizer_model"]
    result, = train_runs([BASE + model_flags + ["--tokenizer-model", tokenizer, "--load", str(tmp_path / "moved"),
                                         "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                                         "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0",
                                         "--override-opt_param-scheduler"]],
                         TOKENIZER_VOCAB)
    assert not isinstance(result, Exception), result
    assert result.test_loss == pytest.approx(trained_checkpoints[name].test_loss, rel=1e-5)


def test_export_deletes_and_replaces_nothing_it_did_not_create(trained_checkpoints, tmp_path, capsys):
    """OUTPUT.tmp is the user's (it was removed, files and all); an --output that is a file or a
    symbolic link is refused in one line with no temporary left behind; the published files,
    the weights included (safetensors writes 0600), have the umask's mode."""
    convert = load_tool("convert_checkpoint")
    save_dir = trained_checkpoints["tp2-none"].save_dir
    (tmp_path / "hf.tmp").mkdir()
    (tmp_path / "hf.tmp" / "notes.txt").write_text("the user's")
    old = os.umask(0o022)
    try:
        assert convert.main(["--to", "hf", "--load", save_dir, "--output", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "hf.tmp" / "notes.txt").read_text() == "the user's"
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes

    (tmp_path / "file").write_text("the user's")
    (tmp_path / "link").symlink_to(tmp_path / "hf")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    capsys.readouterr()
    for target, message in (("file", "exists and is not a directory"), ("link", "is a symbolic link"),
                            ("dangling", "is a symbolic link"), ("hf", "exists and is not empty")):
        assert convert.main(["--to", "hf", "--load", save_dir, "--output", str(tmp_path / target)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "the user's" and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file", "hf", "hf.tmp", "link"]


def test_import_never_replaces_a_checkpoint_directory(trained_checkpoints, tmp_path, capsys):
    convert = load_tool("convert_checkpoint")
    assert convert.main(["--to", "hf", "--load", trained_checkpoints["tp2-none"].save_dir,
                         "--output", str(tmp_path / "hf")]) == 0
    (tmp_path / "ckpt" / "iter_0000000").mkdir(parents=True)  # no `latest`: not refused by that rule
    (tmp_path / "ckpt" / "iter_0000000" / "mine.pt").write_text("the user's")
    capsys.readouterr()
    assert convert.main(["--from", "hf", "--input", str(tmp_path / "hf"), "--save", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert "iter_0000000 already exists; import into a new directory" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "ckpt") == ["iter_0000000"]
    assert (tmp_path / "ckpt" / "iter_0000000" / "mine.pt").read_text() == "the user's"
