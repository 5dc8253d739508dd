"""Llama-family checkpoints <-> Hugging Face LlamaForCausalLM.

Export: checkpoints of every embedding mode (none, Embed LN, Scaled Embed, Embed Detach), tied and
untied, with query groups, saved by training under TP=2, PP=2 and ZeRO-3, load as a plain
LlamaForCausalLM (no trust_remote_code, no code in the directory) whose logits equal ours (fp32,
max abs difference <= 1e-4) and whose greedy generate gives our generate's tokens; lm-eval-harness
through the export gives tools/evaluate.py's perplexities. Import: a small random LlamaForCausalLM
made by transformers becomes our checkpoint under TP=2 and PP=2 with transformers' logits, exports
back bit-identical, generates transformers' greedy tokens under TP=2 (torchrun) and is trained
from. What Llama cannot hold, and what we cannot read, is refused in one line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_snm.checkpoint.read import read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.hf.export import export_to_hf
from megatron_snm.model.gpt import GPTModel, gpt_loss
from megatron_snm.parallel.spawn import free_port
from tests.conftest import REPO, load_tool
from tests.hf_support import BASE, TOKENIZER_VOCAB, build_checkpoints, token_samples, train_runs

ATOL = 1e-4
LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
         "--ffn-hidden-size", "64", "--group-query-attention", "--num-query-groups", "2"]
TP2, PP2, ZERO3 = ["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"], ["--zero-stage", "3"]
UNTIE = ["--untie-embeddings-and-output-weights"]
# name -> flags after LLAMA. Every embedding mode tied and untied over the three saved layouts, with
# the rest of the architecture's choices spread among them: rotary base, interleaved rotary pairs,
# --kv-channels apart from hidden / heads, zero-centred gains, one key/value head.
CONFIGS = {
    "tp2-none": TP2 + ["--embedding-norm", "none"],
    "tp2-layernorm": TP2 + ["--embedding-norm", "layernorm", "--rotary-base", "500000"],
    "tp2-scaled-untied": TP2 + ["--embedding-norm", "scaled"] + UNTIE,
    "tp2-detach-untied-interleaved": TP2 + ["--embedding-norm", "detach", "--rotary-interleaved"] + UNTIE,
    "pp2-scaled-kv16": PP2 + ["--embedding-norm", "scaled", "--kv-channels", "16"],
    "pp2-layernorm-untied-1p": PP2 + ["--embedding-norm", "layernorm", "--apply-layernorm-1p"] + UNTIE,
    "zero3-layernorm-mqa": ZERO3 + ["--embedding-norm", "layernorm", "--num-query-groups", "1"],
    "zero3-detach": ZERO3 + ["--embedding-norm", "detach"],
    "zero3-none-untied": ZERO3 + ["--embedding-norm", "none"] + UNTIE,
}
PROMPT = "We the people"


def config_of(name: str, flag: str, default=None):
    flags = CONFIGS[name]
    return flags[flags.index(flag) + 1] if flag in flags else default


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each configuration trained 2 steps by the real trainer on 2 gloo processes, and saved."""
    return build_checkpoints(str(tmp_path_factory.mktemp("llama")), {n: LLAMA + f for n, f in CONFIGS.items()})


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-hf")
    out = {}
    for name, run in trained.items():
        ckpt = read_checkpoint(run.save_dir)
        assert export_to_hf(ckpt, str(root / name), checkpoint_tokenizer(ckpt)) == "LlamaForCausalLM"
        out[name] = (ckpt, str(root / name))
    return out


def our_logits(ckpt, tokens):
    model = GPTModel(ckpt.gpt_config())
    model.load_state_dict(ckpt.weights)
    with torch.no_grad():
        return model.eval()(tokens)


def plain_llama(directory):
    """transformers' own class, without trust_remote_code: the directory holds no code."""
    from transformers import AutoModelForCausalLM

    assert not [f for f in os.listdir(directory) if f.endswith(".py")]
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=False).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_llama_gives_our_logits(trained, exported, name, one_thread):
    ckpt, directory = exported[name]
    tokens = torch.from_numpy(trained[name].test_samples)
    ours = our_logits(ckpt, tokens[:, :-1])
    # the checkpoint read back is the trained model (its own test loss)
    assert gpt_loss(ours, tokens[:, 1:]).item() == pytest.approx(trained[name].test_loss, rel=1e-5)

    hf = plain_llama(directory)
    assert type(hf).__name__ == "LlamaForCausalLM"
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    mode = config_of(name, "--embedding-norm")
    heads, groups = 4, int(config_of(name, "--num-query-groups", 2))
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == groups
    assert config["head_dim"] == int(config_of(name, "--kv-channels", 32 // heads))
    assert config["rope_theta"] == float(config_of(name, "--rotary-base", 10000))
    assert hf.config.rope_parameters["rope_theta"] == config["rope_theta"]
    assert config["rms_norm_eps"] == 1e-5 and config["intermediate_size"] == 64
    assert config["max_position_embeddings"] == 16 and config["vocab_size"] == TOKENIZER_VOCAB
    assert config["tie_word_embeddings"] == (mode in ("none", "detach") and "untied" not in name)
    assert not config["attention_bias"] and not config["mlp_bias"]
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits
    diff = (theirs - ours[..., :TOKENIZER_VOCAB]).abs().max().item()
    print(f"\n{name}: max |logit diff| {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("name", ["tp2-layernorm", "tp2-detach-untied-interleaved", "pp2-scaled-kv16",
                                  "zero3-layernorm-mqa"])
def test_greedy_generation_equals_hugging_face(trained, exported, name, one_thread):
    from megatron_snm.inference.generate import generate
    from megatron_snm.inference.model import InferenceGPT, start_runtime
    from megatron_snm.inference.sampling import SamplingParams

    ckpt, directory = exported[name]
    _, tokenizer = checkpoint_tokenizer(ckpt)
    model = InferenceGPT(ckpt, tokenizer.vocab_size, start_runtime(1, 1))
    prompt = tokenizer.tokenize(PROMPT)
    ours = list(generate(model, prompt, 8, SamplingParams(greedy=True), eod=None))
    out = plain_llama(directory).generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences[0, len(prompt):].tolist()
    print(f"\n{name}: greedy ours {ours} transformers {theirs}")
    assert ours == theirs
    # A short greedy run can repeat one token; the logits of every step (both sides' KV caches) say more.
    caches = model.new_caches(1)
    steps = [model.forward(torch.tensor([prompt]), caches, 0)[:, -1]]
    steps += [model.forward(torch.tensor([[t]]), caches, len(prompt) + i)[:, -1] for i, t in enumerate(ours[:-1])]
    diff = (torch.cat(steps) - torch.cat(out.logits)).abs().max().item()
    print(f"{name}: max |logit diff| over the 8 cached steps {diff:.2e}")
    assert diff <= ATOL


def test_tokenizer_and_generation_config(exported):
    from transformers import AutoTokenizer, GenerationConfig

    ckpt, directory = exported["pp2-layernorm-untied-1p"]
    _, ours = checkpoint_tokenizer(ckpt)
    theirs = AutoTokenizer.from_pretrained(directory)
    text = PROMPT + " and émoji 🙂"
    assert theirs.encode(text, add_special_tokens=False) == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod
    generation = GenerationConfig.from_pretrained(directory)
    assert generation.eos_token_id == ours.eod and generation.max_length == 16
    config = json.loads(open(os.path.join(directory, "config.json")).read())
    assert config["bos_token_id"] == config["eos_token_id"] == ours.eod


def test_convert_tool_writes_plain_llama(trained, tmp_path, capsys):
    save_dir = trained["zero3-layernorm-mqa"].save_dir
    assert load_tool("convert_checkpoint").main(["--to", "hf", "--load", save_dir, "--output", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "(LlamaForCausalLM)" in out and "embedding norm layernorm" in out and "trust_remote_code" not in out
    assert type(plain_llama(tmp_path / "hf")).__name__ == "LlamaForCausalLM"


def test_evaluate_agrees_with_lm_eval(trained, exported, tmp_path, monkeypatch, capsys, one_thread, sample_dir):
    """lm-eval-harness's rolling log-likelihood on the plain Llama export equals tools/evaluate.py's."""
    import gzip

    import lm_eval
    from lm_eval.tasks import TaskManager

    with gzip.open(sample_dir / "c4-validation.00000-of-00001.json.gz", "rt") as f:
        text = json.loads(f.readline())["text"]
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) > 3][:8]
    documents = tmp_path / "paragraphs.jsonl"
    documents.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    name = "tp2-layernorm"
    assert load_tool("evaluate").main(["--load", trained[name].save_dir, "--jsonl", str(documents)]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ours["tokens"] > 500

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "paragraphs.yaml").write_text(
        "task: llama_paragraphs\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {documents}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no network here: everything is local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported[name][1]}",
                                      tasks=["llama_paragraphs"], device="cpu", batch_size=8,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    theirs = results["results"]["llama_paragraphs"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"\n{metric}: ours {ours[metric]} lm-eval {theirs[f'{metric},none']}")
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-4), metric


# --- import ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """Small random LlamaForCausalLMs made by transformers (GQA: 4 heads, 2 key/value heads; rope_theta
    500000, rms_norm_eps 1e-5; non-trivial norm gains), tied and untied, with a SentencePiece
    tokenizer as transformers saves it (tokenizer.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_snm.checkpoint.tokenizer import TokenizerSpec
    from megatron_snm.hf.tokenizer_files import hf_tokenizer
    from tests.hf_support import train_tokenizer

    root = tmp_path_factory.mktemp("hf-llama")
    spec = TokenizerSpec(tokenizer_type="SentencePieceTokenizer", tokenizer_model=train_tokenizer(str(root / "sp")))
    tokenizer = hf_tokenizer(spec, spec.build(), model_max_length=16)
    out = {}
    for tie in ("tied", "untied"):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                             rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie == "tied",
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(root / tie)
        tokenizer.save_pretrained(root / tie)
        out[tie] = root / tie
    return out


@pytest.fixture(scope="module")
def imported(llama_dirs, tmp_path_factory):
    convert = load_tool("convert_checkpoint")
    out = {}
    for tie, directory in llama_dirs.items():
        for layout, flags in (("tp2", TP2), ("pp2", PP2 + ["--seq-length", "8"])):
            save = tmp_path_factory.mktemp("imported") / f"{tie}-{layout}"
            assert convert.main(["--from", "hf", "--input", str(directory), "--save", str(save)] + flags) == 0
            out[tie, layout] = str(save)
    return out


def hf_logits(directory, tokens):
    with torch.no_grad():
        return plain_llama(directory)(tokens).logits


TEST_TOKENS = torch.randint(0, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", ["tied", "untied"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_imported_logits_equal_llama(llama_dirs, imported, tie, layout, one_thread):
    ckpt = read_checkpoint(imported[tie, layout])
    gpt = ckpt.gpt_config()
    assert ckpt.metadata["parallel"]["tensor_model_parallel_size"] == (2 if layout == "tp2" else 1)
    architecture = (gpt.position_embedding_type, gpt.normalization, gpt.swiglu, gpt.add_bias_linear)
    assert architecture == ("rope", "RMSNorm", True, False)
    assert (gpt.num_query_groups, gpt.rotary_base, gpt.layernorm_epsilon) == (2, 500000, 1e-5)
    assert gpt.embedding_norm == "none" and gpt.untie_embeddings_and_output_weights == (tie == "untied")
    assert (gpt.seq_length, gpt.max_position_embeddings) == (16 if layout == "tp2" else 8, 16)  # --seq-length
    spec, tokenizer = checkpoint_tokenizer(ckpt)
    assert spec.tokenizer_type == "HuggingFaceTokenizer" and tokenizer.vocab_size == TOKENIZER_VOCAB
    ours = our_logits(ckpt, TEST_TOKENS)[..., :TOKENIZER_VOCAB]
    diff = (ours - hf_logits(llama_dirs[tie], TEST_TOKENS)).abs().max().item()
    print(f"\nimport {tie} {layout}: max |logit diff| {diff:.2e}")
    assert diff <= ATOL


@pytest.mark.parametrize("tie", ["tied", "untied"])
def test_export_of_import_is_bit_identical(llama_dirs, imported, tie, tmp_path):
    from safetensors.torch import load_file

    ckpt = read_checkpoint(imported[tie, "pp2"])
    export_to_hf(ckpt, str(tmp_path / "back"), checkpoint_tokenizer(ckpt))
    original, back = (load_file(os.path.join(d, "model.safetensors")) for d in (llama_dirs[tie], tmp_path / "back"))
    assert set(original) == set(back) and (("lm_head.weight" in back) == (tie == "untied"))
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)
    a, b = (json.loads((d / "config.json").read_text()) for d in (llama_dirs[tie], tmp_path / "back"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                "tie_word_embeddings", "hidden_act", "eos_token_id"):
        assert a[key] == b[key], key


def test_greedy_tokens_under_tp2_equal_transformers(llama_dirs, imported, one_thread):
    """tools/generate.py on two ranks (TP=2, the KV cache holding each rank's key/value group)."""
    from transformers import AutoTokenizer

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    argv = ["--load", imported["untied", "tp2"], "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy",
            "--ignore-eod", "--tensor-model-parallel-size", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(REPO / "tools" / "generate.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]
    prompt = AutoTokenizer.from_pretrained(llama_dirs["untied"]).encode(PROMPT, add_special_tokens=False)
    theirs = plain_llama(llama_dirs["untied"]).generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8,
                                                         do_sample=False)[0, len(prompt):].tolist()
    print(f"\nimport TP=2 greedy: ours {ours} transformers {theirs}")
    assert ours == theirs


def test_training_starts_from_the_import(imported, one_thread):
    """pretrain_gpt's loop under TP=2 loads the import (its tokenizer, its architecture flags): the
    first loss is the imported model's on that batch."""
    ckpt = read_checkpoint(imported["untied", "tp2"])
    tokenizer_dir = ckpt.metadata["args"]["tokenizer_model"]  # the import's copy, CKPT/tokenizer
    run = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-4",
           "--eval-iters", "0", "--log-interval", "1", "--embedding-norm", "none", "--rotary-base", "500000",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
           "--tensor-model-parallel-size", "2", "--load", imported["untied", "tp2"]] + LLAMA + UNTIE
    result, = train_runs([run], TOKENIZER_VOCAB)
    assert not isinstance(result, Exception), result
    batch = torch.from_numpy(np.stack([s["text"] for s in token_samples(4, 1, TOKENIZER_VOCAB)]))
    expected = gpt_loss(our_logits(ckpt, batch[:, :-1]), batch[:, 1:]).item()
    assert result.losses[1] == pytest.approx(expected, rel=1e-5)


# --- refusals -------------------------------------------------------------------------------------

def test_import_refuses_what_ours_cannot_hold(llama_dirs, tmp_path, capsys):
    convert = load_tool("convert_checkpoint")
    for key, value, message in (
            ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, "rope_scaling"),
            ("attention_bias", True, "attention_bias true"),
            ("hidden_act", "gelu", "hidden_act 'gelu'")):
        other = tmp_path / key
        shutil.copytree(llama_dirs["tied"], other)
        config = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps(dict(config, **{key: value})))
        assert convert.main(["--from", "hf", "--input", str(other), "--save", str(tmp_path / f"o-{key}")]) == 2
        err = capsys.readouterr().err
        assert f"{other / 'config.json'}: {message}" in err and err.count("\n") == 1, err
        assert not (tmp_path / f"o-{key}").exists()
    argv = ["--from", "hf", "--input", str(llama_dirs["tied"]), "--save", str(tmp_path / "o"),
            "--tensor-model-parallel-size", "4"]  # 2 key/value heads
    assert convert.main(argv) == 2
    assert "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)" in capsys.readouterr().err
    argv = ["--from", "hf", "--input", str(llama_dirs["tied"]), "--save", str(tmp_path / "o"), "--seq-length", "32"]
    assert convert.main(argv) == 2
    assert "--seq-length 32 must be in 1..16, the positions of the model in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _synthetic_checkpoint(path, **architecture) -> str:
    """A Llama-like checkpoint of random weights with some architecture flags changed (not trained:
    only its architecture matters to the refusal)."""
    from megatron_snm.checkpoint.write import write_checkpoint
    from megatron_snm.config import flags_from_dict, gpt_config_of

    shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16)
    args = dict(shape, position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                make_vocab_size_divisible_by=16)
    args.update(architecture)
    flags = flags_from_dict(args)
    model = GPTModel(gpt_config_of(flags, 100))
    write_checkpoint(str(path), model.state_dict(), dict(args=flags.as_dict(), model_shape=shape))
    return str(path)


@pytest.mark.parametrize("architecture, message", [
    (dict(add_bias_linear=True), "biases (no --disable-bias-linear)"),
    (dict(rotary_percent=0.5), "--rotary-percent 0.5"),
    (dict(normalization="LayerNorm"), "--normalization LayerNorm"),
    (dict(swiglu=False), "no --swiglu"),
    (dict(position_embedding_type="learned_absolute", embedding_norm="layernorm"), "--normalization RMSNorm, --swiglu"),
])
def test_export_refuses_what_llama_cannot_hold(architecture, message, tmp_path, capsys):
    save = _synthetic_checkpoint(tmp_path / "ckpt", **architecture)
    assert load_tool("convert_checkpoint").main(["--to", "hf", "--load", save, "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert message in err and "train with --position-embedding-type rope --normalization RMSNorm --swiglu" in err
    assert err.count("\n") == 1 and not (tmp_path / "hf").exists()
