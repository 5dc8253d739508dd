"""Llama-family models (rotary positions, RMSNorm, SwiGLU, grouped-query attention, no biases; the
output layer tied and untied) train with the same losses in every parallel layout as in one
process: TP=2, TP=2 with --sequence-parallel, PP=2, DP=2 under ZeRO-1 and ZeRO-3, with full and
selective recompute; a resumed run continues exactly, and a checkpoint saved under one layout
resumes under another (resharded) with the losses of an unchanged resume. Fp32, no dropout, the
paper's fix on (Embed LN, which is an RMSNorm here)."""
import math

import pytest
import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel
from tests.training_harness import TINY, run_configs

LLAMA = TINY + ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
                "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-decay-iters", "10"]
UNTIED = LLAMA + ["--untie-embeddings-and-output-weights"]
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2-sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "tp2-sp-full-recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--recompute-granularity", "full"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "dp2-zero1": ["--zero-stage", "1"],
    "dp2-zero3-selective-recompute": ["--zero-stage", "3", "--recompute-granularity", "selective"],
}
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    save = {name: tmp_path_factory.mktemp(name) for name in ("tp2", "pp2-untied")}
    one = {"tied": LLAMA, "untied": UNTIED, "untied-bf16": UNTIED + ["--bf16"]}
    two = {f"{name}-{tie}": base + flags for name, flags in LAYOUTS.items()
           for tie, base in (("tied", LLAMA), ("untied", UNTIED))}
    two.update({
        "tp2-save": LLAMA + LAYOUTS["tp2"] + ["--train-iters", "5", "--save", str(save["tp2"])],
        "tp2-resume": LLAMA + LAYOUTS["tp2"] + ["--load", str(save["tp2"])],
        "tp2-resume-as-dp2-zero3": LLAMA + ["--zero-stage", "3", "--load", str(save["tp2"])],
        "pp2-untied-save": UNTIED + LAYOUTS["pp2"] + ["--train-iters", "5", "--save", str(save["pp2-untied"])],
        "pp2-untied-resume": UNTIED + LAYOUTS["pp2"] + ["--load", str(save["pp2-untied"])],
        "pp2-untied-resume-as-tp2-sp": UNTIED + LAYOUTS["tp2-sp"] + ["--load", str(save["pp2-untied"])],
    })
    results = dict(zip(one, run_configs(1, list(one.values()))))
    results.update(zip(two, run_configs(2, list(two.values()))))
    return results


def test_llama_learns_in_one_process(runs):
    for tie in ("tied", "untied"):
        run = runs[tie]
        assert run.losses[10] < run.losses[1] - 0.1, tie
    assert runs["tied"].losses != pytest.approx(runs["untied"].losses, rel=1e-3)


def test_bf16_tracks_fp32(runs):
    assert runs["untied-bf16"].losses == pytest.approx(runs["untied"].losses, rel=2e-2)


@pytest.mark.parametrize("tie", ["tied", "untied"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(runs, layout, tie):
    run, reference = runs[f"{layout}-{tie}"], runs[tie]
    assert not isinstance(run, Exception), run
    assert sorted(run.losses) == list(range(1, 11))
    assert run.losses == pytest.approx(reference.losses, rel=RTOL)
    assert run.valid_losses == pytest.approx(reference.valid_losses, rel=RTOL)
    assert run.test_loss == pytest.approx(reference.test_loss, rel=RTOL)


@pytest.mark.parametrize("saved, straight", [("tp2", "tp2-tied"), ("pp2-untied", "pp2-untied")])
def test_resume_continues_exactly_and_reshards(runs, saved, straight):
    reference = runs[straight]
    resumed = [runs[name] for name in runs if name.startswith(f"{saved}-resume")]
    assert len(resumed) == 2
    for run in resumed:
        assert not isinstance(run, Exception), run
        assert sorted(run.losses) == list(range(6, 11))
        for it in range(6, 11):
            assert run.losses[it] == pytest.approx(reference.losses[it], rel=RTOL), it
        assert run.test_loss == pytest.approx(reference.test_loss, rel=RTOL)


def _config(**overrides) -> GPTConfig:
    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=16, vocab_size=100,
                 position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
                 add_bias_linear=False)
    return GPTConfig(**{**shape, **overrides}).validate()


def test_query_groups_shrink_key_value_projection():
    full, grouped = GPTModel(_config(num_query_groups=8)), GPTModel(_config(num_query_groups=2))
    qkv = lambda m: m.layers[0].attention.qkv.weight.shape[0]  # noqa: E731
    assert qkv(full) == 3 * 64 and qkv(grouped) == 64 + 2 * 2 * 8


def test_grouped_attention_equals_multi_head_with_shared_keys():
    """A grouped model equals the multi-head model whose key/value heads are copies of each group's."""
    torch.manual_seed(0)
    grouped = GPTModel(_config(num_query_groups=2, num_layers=1))
    full = GPTModel(_config(num_query_groups=8, num_layers=1))
    state = grouped.state_dict()
    d, heads, groups = 8, 8, 2
    w = state["layers.0.attention.qkv.weight"].view(groups, heads // groups + 2, d, 64)
    q, k, v = w[:, :-2], w[:, -2:-1], w[:, -1:]
    per_head = [torch.cat([q[g, j:j + 1], k[g], v[g]]) for g in range(groups) for j in range(heads // groups)]
    state["layers.0.attention.qkv.weight"] = torch.cat(per_head).reshape(-1, 64)
    full.load_state_dict(state)
    tokens = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(full(tokens), grouped(tokens), rtol=1e-5, atol=1e-6)


def test_rotary_attention_depends_on_relative_position_only():
    from megatron_snm.model.rotary import RotaryEmbedding

    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = [(rope(q, p + 5) * rope(k, p)).sum().item() for p in (0, 3, 11)]
    assert dots == pytest.approx([dots[0]] * 3, rel=1e-5)
    assert (q * k).sum().item() != pytest.approx(dots[0], rel=1e-3)


def test_rotary_percent_leaves_the_other_channels():
    from megatron_snm.model.rotary import RotaryEmbedding

    x = torch.randn(1, 2, 3, 8)
    y = RotaryEmbedding(4)(x, 7)
    assert torch.equal(y[..., 4:], x[..., 4:]) and not torch.allclose(y[..., :4], x[..., :4])


def test_swiglu_default_ffn_is_megatrons():
    assert _config(hidden_size=4096, num_attention_heads=32).ffn_hidden_size == int(4 * 4096 * 2 / 3 / 64) * 64
    assert _config(swiglu=False).ffn_hidden_size == 4 * 64


def test_scaled_init_shrinks_the_residual_writers():
    """W_O and SwiGLU's down-projection at sigma / sqrt(2N); every other matrix at sigma."""
    config = _config(num_layers=4, hidden_size=256, num_attention_heads=8, init_method_std=0.02)
    model = GPTModel(config)
    block = model.layers[0]
    small = 0.02 / math.sqrt(2 * 4)
    for weight, std in ((block.attention.dense.weight, small), (block.mlp.fc2.weight, small),
                        (block.attention.qkv.weight, 0.02), (block.mlp.gate.weight, 0.02),
                        (block.mlp.fc1.weight, 0.02)):
        assert weight.std().item() == pytest.approx(std, rel=0.05)


def test_embed_ln_is_the_models_norm():
    from megatron_snm.model.norm import is_norm

    model = GPTModel(_config(embedding_norm="layernorm"))
    assert type(model.embedding.norm).__name__ == "FusedRMSNorm" and is_norm(model.embedding.norm)
    assert model.embedding.position_embeddings is None
