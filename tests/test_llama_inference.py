"""Evaluation and generation of Llama-family checkpoints (rotary positions, RMSNorm, SwiGLU, 8 query
heads in 2 groups, no biases; tied and untied): generation with the KV cache gives the tokens of a loop
that recomputes the whole sequence for every token (so rotary positions continue from the cache's
length); tools/evaluate.py and tools/generate.py under TP=2 and PP=2 (torchrun) give the single-process
perplexity and greedy tokens; the cache holds one key/value head per query group, heads / groups times
less memory than one per head."""
import json

import pytest
import torch

from megatron_snm.checkpoint.read import read_checkpoint
from megatron_snm.checkpoint.tokenizer import checkpoint_tokenizer
from megatron_snm.inference.generate import generate
from megatron_snm.inference.model import InferenceGPT, start_runtime
from megatron_snm.inference.sampling import SamplingParams
from megatron_snm.parallel.spawn import run_distributed
from tests.hf_support import build_checkpoints
from tests.test_inference_tools import documents, run_tool, torchrun  # noqa: F401 (documents: a fixture)

HEADS, GROUPS = 8, 2
# A larger init and more steps than the export tests' checkpoints: attention sharp enough that positions
# decide the greedy tokens (rotary angles that restarted at 0 after the cache move the logits by about 4
# and change the tokens), and an output that is not the input token repeated.
LLAMA = ["--hidden-size", "64", "--num-attention-heads", str(HEADS), "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--group-query-attention",
         "--init-method-std", "0.2", "--train-iters", "20", "--lr", "1e-2"]
CONFIGS = {  # saved under TP=2 and PP=2, read under every layout
    "tied": ["--tensor-model-parallel-size", "2", "--embedding-norm", "layernorm", *LLAMA,
             "--num-query-groups", str(GROUPS)],
    "untied": ["--pipeline-model-parallel-size", "2", "--embedding-norm", "scaled", *LLAMA,
               "--num-query-groups", str(GROUPS), "--untie-embeddings-and-output-weights"],
    "no-gqa": ["--embedding-norm", "layernorm", *LLAMA, "--num-query-groups", str(HEADS)],  # a key/value head per head
}
PROMPT = "She said that"  # 6 tokens: room for 8 new ones in --seq-length 16
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return build_checkpoints(str(tmp_path_factory.mktemp("llama")), CONFIGS)


def inference_model(save_dir):
    ckpt = read_checkpoint(save_dir)
    _, tokenizer = checkpoint_tokenizer(ckpt)
    return InferenceGPT(ckpt, tokenizer.vocab_size, start_runtime(1, 1)), tokenizer


def json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def recomputed_greedy(model, prompt, count):
    """Greedy tokens with no cache: the whole sequence through the model for every new token."""
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(model.forward(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_cached_generation_equals_recomputation(checkpoints, name, one_thread):
    model, _ = inference_model(checkpoints[name].save_dir)
    assert model.config.position_embedding_type == "rope" and model.config.num_query_groups == GROUPS
    tokens = torch.from_numpy(checkpoints[name].test_samples[:1, :16])
    full = model.forward(tokens)
    caches = model.new_caches(1)
    steps = [model.forward(tokens[:, :5], caches, 0)]  # a prompt, then one token at a time
    steps += [model.forward(tokens[:, i:i + 1], caches, i) for i in range(5, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5

    prompt = tokens[0, :4].tolist()
    assert list(generate(model, prompt, 12, SamplingParams(greedy=True))) == recomputed_greedy(model, prompt, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_tools_under_tp2_and_pp2_give_the_single_process_figures(checkpoints, documents, name, capsys,  # noqa: F811
                                                                 one_thread):
    save_dir = checkpoints[name].save_dir
    evaluate = ["--load", save_dir, "--jsonl", str(documents), "--max-documents", "6", "--stride", "8"]
    code, out, err = run_tool("evaluate", evaluate, capsys)
    single = json_line(out)
    assert code == 0 and single["tokens"] > 500 and 1 < single["perplexity"] < 1e6, err
    gen = ["--load", save_dir, "--prompt", PROMPT, "--max-new-tokens", "8", "--greedy", "--ignore-eod"]
    code, out, err = run_tool("generate", gen, capsys)
    tokens = json_line(out)["token_ids"]
    model, tokenizer = inference_model(save_dir)
    assert code == 0 and tokens == recomputed_greedy(model, tokenizer.tokenize(PROMPT), 8), err
    assert len(set(tokens)) > 2, f"{tokens}: too uniform for the layouts' comparison to mean much"

    for layout, flags in LAYOUTS.items():
        parallel = torchrun("evaluate", evaluate + flags)
        assert parallel["tokens"] == single["tokens"], layout
        assert parallel["perplexity"] == pytest.approx(single["perplexity"], rel=1e-5), layout
        assert torchrun("generate", gen + flags)["token_ids"] == tokens, layout


def cache_bytes(model, batch: int) -> int:
    return sum(c.keys.nbytes + c.values.nbytes for c in model.new_caches(batch))


def _tp2_cache_bytes(rank, world_size, save_dir, batch):
    ckpt = read_checkpoint(save_dir)
    _, tokenizer = checkpoint_tokenizer(ckpt)
    return cache_bytes(InferenceGPT(ckpt, tokenizer.vocab_size, start_runtime(2, 1)), batch)


def test_kv_cache_holds_the_query_groups(checkpoints, one_thread):
    """Keys and values are cached once per query group: with 8 heads in 2 groups the cache is 4 times
    smaller than with a key/value head per query head, 2 x layers x groups x head_dim x length x batch
    x bytes per element; under TP=2 each rank holds half the groups."""
    batch = 3

    def measured(name):
        model, _ = inference_model(checkpoints[name].save_dir)
        config = model.config
        expected = (2 * config.num_layers * config.num_query_groups * config.head_dim * config.seq_length * batch
                    * torch.finfo(model.dtype).bits // 8)
        assert cache_bytes(model, batch) == expected, name
        return expected

    gqa, per_head = measured("tied"), measured("no-gqa")
    assert per_head * GROUPS == gqa * HEADS
    assert run_distributed(_tp2_cache_bytes, 2, checkpoints["tied"].save_dir, batch) == [gqa // 2] * 2
