"""The stability monitor on a 12-layer model shows the paper's two mechanisms, and costs nothing
when off."""
import pytest
import torch

from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel
from megatron_snm.training.monitor import StabilityMonitor
from tests.model_shapes import tiny

SHAPE = tiny(num_layers=12, hidden_size=128, seq_length=64, vocab_size=1000)


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (4, 64), generator=g), torch.randint(0, 1000, (4, 64), generator=g)


def _figures(**overrides):
    model = GPTModel(GPTConfig(**SHAPE, **overrides))
    tokens, labels = _batch()
    monitor = StabilityMonitor(model)
    with monitor.capture():
        model(tokens, labels).mean().backward()
    return monitor.figures()


def _hook_count(model):
    modules = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    return modules + sum(len(p._backward_hooks or {}) for p in model.parameters())


@pytest.fixture(scope="module")
def figures():
    return {mode: _figures(embedding_norm=mode) for mode in ("none", "layernorm", "scaled")}


def test_layernorm_gradient_amplification_is_one_over_input_std(figures):
    """Mechanism 2: with the vanilla embedding (std ~ sqrt(2) sigma << 1) the shallow LayerNorms
    multiply the gradient by ~1/std(x); with Embed LN (std 1) by ~1."""
    print("\nmode       emb std  LN1 in std  LN1 amp  1/std   LN(6) amp  LN(12) amp  |g| L1  |g| L12")
    for mode, f in figures.items():
        print(f"{mode:10s} {f['residual_std/embedding']:.4f}   {f['ln_input_std/layer_01.ln_1']:.4f}"
              f"      {f['ln_amplification/layer_01.ln_1']:6.2f}  {1 / f['ln_input_std/layer_01.ln_1']:6.2f}"
              f"  {f['ln_amplification/layer_06.ln_1']:6.2f}     {f['ln_amplification/layer_12.ln_1']:6.2f}"
              f"      {f['grad_norm/layer_01']:.3f}  {f['grad_norm/layer_12']:.3f}")
    for mode, f in figures.items():
        for ln in ("layer_01.ln_1", "layer_01.ln_2", "layer_02.ln_1"):
            predicted = 1 / f[f"ln_input_std/{ln}"]
            assert abs(f[f"ln_amplification/{ln}"] / predicted - 1) < 0.15, (mode, ln, f[f"ln_amplification/{ln}"], predicted)
    assert figures["none"]["ln_amplification/layer_01.ln_1"] > 8
    assert 0.8 < figures["layernorm"]["ln_amplification/layer_01.ln_1"] < 1.25
    # and the shallow blocks' parameter gradients are the ones blown up
    assert figures["none"]["grad_norm/layer_01"] > 3 * figures["layernorm"]["grad_norm/layer_01"]


def test_figures_cover_every_layer_as_plain_floats(figures):
    f = figures["layernorm"]
    assert all(isinstance(v, float) for v in f.values())
    for n in range(1, 13):
        assert {f"residual_std/layer_{n:02d}", f"grad_norm/layer_{n:02d}", f"ln_amplification/layer_{n:02d}.ln_2"} <= f.keys()
    assert {"ln_amplification/embedding.norm", "ln_amplification/final_norm"} <= f.keys()
    assert "ln_amplification/embedding.norm" not in figures["none"]


def test_scaled_init_keeps_the_residual_stream_from_growing():
    """Mechanism 1: without scaled W_O/W_2 each block adds more to the residual stream."""
    def growth(scaled_init):
        model = GPTModel(GPTConfig(**SHAPE, scaled_init=scaled_init))
        monitor = StabilityMonitor(model)
        with monitor.capture(), torch.no_grad():
            model(_batch()[0])
        f = monitor.figures()
        return f["residual_std/layer_12"] / f["residual_std/embedding"]
    scaled, unscaled = growth(True), growth(False)
    print(f"\nresidual std growth over 12 layers: scaled init {scaled:.2f}x, --no-scaled-init {unscaled:.2f}x")
    assert unscaled > 1.5 * scaled


def test_off_means_no_hooks_and_checkpointing_gives_the_same_figures():
    model = GPTModel(GPTConfig(**SHAPE, embedding_norm="none", recompute_granularity="full"))
    monitor = StabilityMonitor(model)
    assert _hook_count(model) == 0
    tokens, labels = _batch()
    with monitor.capture():
        assert _hook_count(model) > 0
        model(tokens, labels).mean().backward()
    assert _hook_count(model) == 0
    ckpt, plain = monitor.figures(), _figures(embedding_norm="none")
    assert ckpt.keys() == plain.keys()
    for key in plain:
        assert abs(ckpt[key] - plain[key]) <= 1e-4 * abs(plain[key]), key


def test_grad_norms_of_embedding_blocks_and_final_norm_make_up_the_global_norm():
    """The per-module gradient norms partition the model's parameters, so their squares add up to
    the global gradient norm squared: a spike in the global norm can be attributed."""
    model = GPTModel(GPTConfig(**SHAPE, embedding_norm="layernorm"))
    tokens, labels = _batch()
    monitor = StabilityMonitor(model)
    with monitor.capture():
        model(tokens, labels).mean().backward()
    f = monitor.figures()
    parts = [v for k, v in f.items() if k.startswith("grad_norm/")]
    assert len(parts) == 12 + 2 and {"grad_norm/embedding", "grad_norm/final_norm"} <= f.keys()
    global_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    assert abs(sum(v * v for v in parts) ** 0.5 / global_norm - 1) < 1e-5
    table = model.embedding.word_embeddings.weight.grad.norm().item()
    assert table <= f["grad_norm/embedding"] and f["grad_norm/final_norm"] > 0
