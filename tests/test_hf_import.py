"""Import from Hugging Face: a GPT2LMHeadModel becomes our checkpoint for TP=2 or PP=2 whose
logits equal GPT-2's, export(import(x)) == x exactly, and pretrain_gpt's loop starts from it
(its first loss is the imported model's); bad input is refused in one line."""
import json
import shutil

import pytest
import torch

from megatron_snm.checkpoint.layout import resize_rows
from megatron_snm.checkpoint.read import read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.config import ConfigError
from megatron_snm.hf.export import export_to_hf
from megatron_snm.model.gpt import GPTModel, gpt_loss
from tests.conftest import load_tool
from tests.hf_support import token_samples, train_runs

GPT2_VOCAB, SEQ = 50257, 32


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, gpt2_files):
    """A tiny random GPT-2 (GELU tanh approximation, as GPT-2) with GPT-2's tokenizer files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    model.save_pretrained(path)
    for f in gpt2_files:
        shutil.copy(f, path)
    return path


@pytest.fixture(scope="module")
def imported(gpt2_dir, tmp_path_factory):
    convert = load_tool("convert_checkpoint")
    out = {}
    for layout, flags in (("tp2", ["--tensor-model-parallel-size", "2"]), ("pp2", ["--pipeline-model-parallel-size", "2"])):
        save = tmp_path_factory.mktemp("imported") / layout
        assert convert.main(["--from", "hf", "--input", str(gpt2_dir), "--save", str(save)] + flags) == 0
        out[layout] = str(save)
    return out


def gpt2_logits(gpt2_dir, tokens):
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()(tokens).logits


def our_model(ckpt):
    model = GPTModel(ckpt.gpt_config())
    model.load_state_dict(ckpt.weights)
    return model.eval()


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_imported_logits_equal_gpt2(gpt2_dir, imported, layout, one_thread):
    ckpt = read_checkpoint(imported[layout])
    assert ckpt.metadata["parallel"]["tensor_model_parallel_size"] == (2 if layout == "tp2" else 1)
    assert ckpt.run_config.model.openai_gelu and ckpt.gpt_config().embedding_norm == "none"
    spec, tokenizer = checkpoint_tokenizer(ckpt)
    assert spec.tokenizer_type == "GPT2BPETokenizer" and tokenizer.vocab_size == GPT2_VOCAB
    tokens = torch.randint(0, GPT2_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = our_model(ckpt)(tokens)[..., :GPT2_VOCAB]
    assert (ours - gpt2_logits(gpt2_dir, tokens)).abs().max().item() <= 1e-4


def test_export_of_import_is_the_original(gpt2_dir, imported, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt = read_checkpoint(imported["tp2"])
    export_to_hf(ckpt, str(tmp_path / "back"), checkpoint_tokenizer(ckpt))
    original, back = (GPT2LMHeadModel.from_pretrained(d).state_dict() for d in (gpt2_dir, tmp_path / "back"))
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    a, b = (GPT2Config.from_pretrained(d).to_diff_dict() for d in (gpt2_dir, tmp_path / "back"))
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function", "layer_norm_epsilon"):
        assert a.get(key) == b.get(key), key


def test_training_starts_from_the_import(imported, gpt2_files, one_thread):
    vocab, merges = gpt2_files
    run = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-4",
           "--eval-iters", "0", "--log-interval", "1", "--tokenizer-type", "GPT2BPETokenizer",
           "--vocab-file", str(vocab), "--merge-file", str(merges), "--embedding-norm", "none"]
    results = train_runs([run + ["--openai-gelu", "--tensor-model-parallel-size", "2", "--load", imported["tp2"]],
                          run + ["--openai-gelu", "--pipeline-model-parallel-size", "2", "--load", imported["pp2"]],
                          run + ["--tensor-model-parallel-size", "2", "--load", imported["tp2"]],
                          # ZeRO-3 partitions the weights-only checkpoint as it loads (checkpoint/reshard.py)
                          run + ["--openai-gelu", "--zero-stage", "3", "--load", imported["pp2"]]], GPT2_VOCAB)
    batch = torch.from_numpy(__import__("numpy").stack([s["text"] for s in token_samples(4, 1, GPT2_VOCAB)]))
    for layout, result in zip(("tp2", "pp2", None, "pp2"), results):
        if layout is None:
            continue
        ckpt = read_checkpoint(imported[layout])
        with torch.no_grad():
            expected = gpt_loss(our_model(ckpt)(batch[:, :-1]), batch[:, 1:]).item()
        assert result.losses[1] == pytest.approx(expected, rel=1e-5)
    assert isinstance(results[2], ConfigError) and "--openai-gelu" in str(results[2])


def test_untied_lm_head_is_imported_as_an_untied_output_layer(gpt2_dir, gpt2_files, tmp_path, one_thread):
    """A GPT-2 whose lm_head is its own table: imported for PP=2 (the output layer's file on the last
    stage) with --untie-embeddings-and-output-weights, its logits GPT-2's, and exported back unchanged."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    model.config.tie_word_embeddings = False
    untied = GPT2LMHeadModel(model.config)
    untied.load_state_dict(model.state_dict())
    with torch.no_grad():
        untied.lm_head.weight.copy_(torch.randn_like(untied.lm_head.weight) * 0.02)
    untied.save_pretrained(tmp_path / "untied")
    for f in gpt2_files:
        shutil.copy(f, tmp_path / "untied")
    convert = load_tool("convert_checkpoint")
    assert convert.main(["--from", "hf", "--input", str(tmp_path / "untied"), "--save", str(tmp_path / "ours"),
                         "--pipeline-model-parallel-size", "2"]) == 0
    ckpt = read_checkpoint(str(tmp_path / "ours"))
    assert ckpt.gpt_config().untie_embeddings_and_output_weights and "output.weight" in ckpt.weights
    tokens = torch.randint(0, GPT2_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = our_model(ckpt)(tokens)[..., :GPT2_VOCAB]
    assert (ours - gpt2_logits(tmp_path / "untied", tokens)).abs().max().item() <= 1e-4
    export_to_hf(ckpt, str(tmp_path / "back"), checkpoint_tokenizer(ckpt))
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back")
    assert not back.config.tie_word_embeddings
    assert all(torch.equal(untied.state_dict()[k], back.state_dict()[k]) for k in untied.state_dict())


def test_padding_rows_take_little_probability():
    """Rows added for a larger TP padding are the mean row: their logit is the average logit."""
    table = torch.randn(10, 4)
    padded = resize_rows(table, 16)
    assert torch.equal(padded[:10], table) and torch.allclose(padded[10:], table.mean(0).expand(6, 4))


def test_import_refuses_bad_input(gpt2_dir, tmp_path, capsys):
    convert = load_tool("convert_checkpoint")
    other = tmp_path / "other"
    shutil.copytree(gpt2_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    assert convert.main(["--from", "hf", "--input", str(other), "--save", str(tmp_path / "o")]) == 2
    assert "model_type 'mistral'; only GPT-2 (GPT2LMHeadModel), Llama" in capsys.readouterr().err

    argv = ["--from", "hf", "--input", str(gpt2_dir), "--save", str(tmp_path / "o"), "--tensor-model-parallel-size", "3"]
    assert convert.main(argv) == 2
    assert "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "latest").exists()
