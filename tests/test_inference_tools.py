"""Evaluation and generation: the KV cache gives the full forward pass's logits; greedy generation
gives Hugging Face generate's tokens on the exported model; tools/evaluate.py's perplexities equal
lm-eval-harness's on the export; TP=2 and PP=2 under torchrun give the single-process figures;
bad input is refused in one line."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_snm.checkpoint.read import read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.hf.export import export_to_hf
from megatron_snm.inference.generate import generate
from megatron_snm.parallel.spawn import free_port
from megatron_snm.inference.model import InferenceGPT, start_runtime
from megatron_snm.inference.sampling import SamplingParams
from tests.conftest import REPO, load_tool

PROMPT = "We the people"  # 5 tokens: room for 8 new ones in --seq-length 16


@pytest.fixture(scope="module")
def documents(tmp_path_factory, sample_dir):
    """Paragraphs of the validation sample, one JSON line each."""
    import gzip

    with gzip.open(sample_dir / "c4-validation.00000-of-00001.json.gz", "rt") as f:
        text = json.loads(f.readline())["text"]
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.split()) > 3][:12]
    path = tmp_path_factory.mktemp("docs") / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def inference_model(save_dir):
    ckpt = read_checkpoint(save_dir)
    _, tokenizer = checkpoint_tokenizer(ckpt)
    return InferenceGPT(ckpt, tokenizer.vocab_size, start_runtime(1, 1)), tokenizer


def run_tool(name, argv, capsys):
    code = load_tool(name).main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_kv_cache_gives_the_full_forward(trained_checkpoints, one_thread):
    model, _ = inference_model(trained_checkpoints["tp2-layernorm"].save_dir)
    tokens = torch.from_numpy(trained_checkpoints["tp2-layernorm"].test_samples[:1, :16])
    full = model.forward(tokens)
    caches = model.new_caches(1)
    steps = [model.forward(tokens[:, :5], caches, 0)]  # a prompt, then one token at a time
    steps += [model.forward(tokens[:, i:i + 1], caches, i) for i in range(5, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["tp2-layernorm", "pp2-scaled", "tp2-untied-longpos", "pp2-untied-scaled"])
def test_greedy_generation_equals_hugging_face(trained_checkpoints, tmp_path, name, one_thread, capsys):
    from transformers import AutoModelForCausalLM

    model, tokenizer = inference_model(trained_checkpoints[name].save_dir)
    prompt = tokenizer.tokenize(PROMPT)
    ours = list(generate(model, prompt, 8, SamplingParams(greedy=True), eod=None))
    export_to_hf(model_ckpt := read_checkpoint(trained_checkpoints[name].save_dir), str(tmp_path / "hf"),
                 checkpoint_tokenizer(model_ckpt))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()

    code, out, _ = run_tool("generate", ["--load", trained_checkpoints[name].save_dir, "--prompt", PROMPT,
                                         "--max-new-tokens", "8", "--greedy", "--ignore-eod"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["token_ids"] == ours
    assert tokenizer.detokenize(prompt) + result["text"] == tokenizer.detokenize(prompt + ours)


@pytest.mark.parametrize("name", ["tp2-untied-longpos", "pp2-untied-scaled"])
def test_untied_long_position_checkpoint_evaluates(trained_checkpoints, documents, name, capsys, one_thread):
    """The inference model of an untied checkpoint with more positions than --seq-length is the trained
    model (its own output table), and the evaluation tool reads it."""
    from megatron_snm.model.gpt import GPTModel

    save_dir = trained_checkpoints[name].save_dir
    model, tokenizer = inference_model(save_dir)
    ckpt = read_checkpoint(save_dir)
    trained = GPTModel(ckpt.gpt_config())
    trained.load_state_dict(ckpt.weights)
    tokens = torch.from_numpy(trained_checkpoints[name].test_samples[:, :16])
    with torch.no_grad():
        expected = trained.eval()(tokens)[..., :tokenizer.vocab_size]
    assert (model.forward(tokens) - expected).abs().max().item() <= 1e-5
    code, out, _ = run_tool("evaluate", ["--load", save_dir, "--jsonl", str(documents)], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["tokens"] > 1000 and 1 < result["perplexity"] < 1e6


def test_sampling_is_seeded_and_stays_in_top_k(trained_checkpoints, one_thread):
    model, _ = inference_model(trained_checkpoints["tp2-none"].save_dir)
    params = SamplingParams(temperature=1.5, top_k=3, top_p=0.9)
    first, again = (list(generate(model, [5, 6, 7], 6, params, seed=11)) for _ in range(2))
    assert first == again
    caches = model.new_caches(1)
    logits = model.forward(torch.tensor([[5, 6, 7]]), caches, 0)[0, -1]
    assert first[0] in logits.topk(3).indices.tolist()


def test_evaluate_agrees_with_lm_eval(trained_checkpoints, documents, tmp_path, capsys, monkeypatch, one_thread):
    import lm_eval
    from lm_eval.tasks import TaskManager

    save_dir = trained_checkpoints["tp2-layernorm"].save_dir
    code, out, _ = run_tool("evaluate", ["--load", save_dir, "--jsonl", str(documents)], capsys)
    ours = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and ours["tokens"] > 1000 and ours["perplexity"] > 1

    ckpt = read_checkpoint(save_dir)
    export_to_hf(ckpt, str(tmp_path / "hf"), checkpoint_tokenizer(ckpt))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "paragraphs.yaml").write_text(
        "task: sample_paragraphs\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {documents}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # no network here: everything is local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True",
                                      tasks=["sample_paragraphs"], device="cpu", batch_size=8,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    theirs = results["results"]["sample_paragraphs"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-4), metric


def torchrun(tool, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()),
                           str(REPO / "tools" / f"{tool}.py"), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_parallel_layouts_give_the_single_process_figures(trained_checkpoints, documents, capsys, one_thread):
    save_dir = trained_checkpoints["zero3-layernorm"].save_dir  # saved under ZeRO-3 with DP=2
    argv = ["--load", save_dir, "--jsonl", str(documents), "--max-documents", "6", "--stride", "8"]
    _, out, _ = run_tool("evaluate", argv, capsys)
    single = json.loads(out.strip().splitlines()[-1])
    tp2 = torchrun("evaluate", argv + ["--tensor-model-parallel-size", "2"])
    assert tp2["tokens"] == single["tokens"] and tp2["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5)

    gen = ["--load", save_dir, "--prompt", PROMPT, "--max-new-tokens", "6", "--greedy", "--ignore-eod"]
    _, out, _ = run_tool("generate", gen, capsys)
    pp2 = torchrun("generate", gen + ["--pipeline-model-parallel-size", "2"])
    assert pp2["token_ids"] == json.loads(out.strip().splitlines()[-1])["token_ids"]


def test_tools_refuse_bad_input(trained_checkpoints, documents, tmp_path, capsys):
    from tests.hf_support import train_tokenizer

    save_dir = trained_checkpoints["tp2-none"].save_dir
    other = train_tokenizer(str(tmp_path / "sp400"), vocab_size=400)
    cases = {
        ("evaluate", "--load", str(tmp_path / "missing"), "--jsonl", str(documents)): "no such checkpoint directory",
        ("evaluate", "--load", save_dir, "--jsonl", str(documents), "--num-layers", "6"): "with --num-layers 2, not 6",
        ("evaluate", "--load", save_dir, "--jsonl", str(documents), "--seq-length", "64"): "has --seq-length 16",
        ("evaluate", "--load", save_dir, "--jsonl", str(documents), "--tokenizer-model", other):
            "has 400 tokens, which padded for TP 2 gives 416 rows, but",
        ("evaluate", "--load", save_dir, "--jsonl", str(tmp_path / "none.jsonl")): "none.jsonl: No such file",
        ("evaluate", "--load", save_dir, "--data-path", str(tmp_path / "nodata")): "nodata.idx: no such file",
        ("generate", "--load", str(tmp_path / "missing"), "--prompt", "x"): "no such checkpoint directory",
        ("generate", "--load", save_dir, "--prompt", "x", "--hidden-size", "64"): "with --hidden-size 32, not 64",
        ("generate", "--load", save_dir, "--prompt", "x", "--top-p", "0"): "--top-p must be in (0, 1]",
        ("generate", "--load", save_dir, "--prompt", "word " * 40): "--seq-length is 16",
    }
    for (tool, *argv), message in cases.items():
        code, out, err = run_tool(tool, argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_generation_cut_by_the_context_length_says_so(trained_checkpoints, capsys):
    """--max-new-tokens beyond the model's positions: the output stops there, and the run says so, in
    the JSON line too (it did not before: 1,000,000 asked, 11 given, nothing said)."""
    save_dir = trained_checkpoints["tp2-layernorm"].save_dir
    argv = ["--load", save_dir, "--prompt", PROMPT, "--greedy", "--ignore-eod"]
    code, out, err = run_tool("generate", argv + ["--max-new-tokens", "1000000"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["stopped_at_context_length"] is True and result["stopped_at_eod"] is False
    assert len(result["token_ids"]) == 16 - 5  # --seq-length 16, a 5-token prompt
    assert "stopped after 11 of --max-new-tokens 1000000" in err and "context length (16" in err
    code, out, err = run_tool("generate", argv + ["--max-new-tokens", "4"], capsys)
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 4 and result["stopped_at_context_length"] is False and "stopped after" not in err


def test_evaluate_scores_the_held_out_documents_by_default(trained_checkpoints, tmp_path, capsys):
    """--data-path is scored on the part of --split the run never trained on (the checkpoint's split,
    969,30,1), not on its first documents; --split and --split-part choose."""
    import numpy as np

    from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "data_text_document")
    rng = np.random.default_rng(0)
    lengths = [20 + i for i in range(100)]
    builder = IndexedDatasetBuilder(prefix)
    for n in lengths:
        builder.add_document(rng.integers(3, 400, n).tolist())
    builder.finalize()
    save_dir = trained_checkpoints["tp2-none"].save_dir

    def evaluate(*extra):
        code, out, err = run_tool("evaluate", ["--load", save_dir, "--data-path", prefix, *extra], capsys)
        assert code == 0, err
        return json.loads(out.strip().splitlines()[-1]), err

    held_out, err = evaluate()  # 969,30,1 of 100 documents: 97 train, 3 valid, 0 test
    assert held_out["documents"] == [97, 100] and held_out["split"] == "969,30,1"
    assert held_out["tokens"] == sum(lengths[97:]) - 1 and "the held-out part of --split 969,30,1 (the checkpoint's)" in err
    test, _ = evaluate("--split", "80,10,10", "--split-part", "test")
    assert test["documents"] == [90, 100] and test["tokens"] == sum(lengths[90:]) - 1
    every, _ = evaluate("--split-part", "all")
    assert every["documents"] == [0, 100] and every["tokens"] == sum(lengths) - 1
    code, _, err = run_tool("evaluate", ["--load", save_dir, "--data-path", prefix, "--split-part", "test"], capsys)
    assert code == 2 and "leaves the test part of the 100 documents empty" in err and err.count("\n") == 1


def test_text_files_that_are_not_utf8_are_named_with_their_line(trained_checkpoints, tmp_path, capsys):
    save_dir = trained_checkpoints["tp2-none"].save_dir
    prompts, lines = tmp_path / "prompts.txt", tmp_path / "docs.jsonl"
    prompts.write_bytes(b"We the people\nCaf\xe9 au lait\n")
    lines.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    for tool, argv, where in (("generate", ["--prompt-file", str(prompts)], f"--prompt-file {prompts}:2:"),
                              ("evaluate", ["--jsonl", str(lines)], f"--jsonl {lines}:2:"),
                              ("evaluate", ["--lambada", str(lines)], f"--lambada {lines}:2:")):
        code, out, err = run_tool(tool, ["--load", save_dir, *argv], capsys)
        assert code == 2 and where in err and "not UTF-8" in err and "0xe9" in err and err.count("\n") == 1, err
