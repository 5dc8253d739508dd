"""GPT model on one process: shapes, the pieces (pipeline-friendly, deterministic), the paper's
embedding modes, precision, presets on the meta device, and configuration errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_snm.model.config import GPTConfig, padded_vocab_size
from megatron_snm.model.embedding import GPTEmbedding
from megatron_snm.model.gpt import GPTModel, gpt_loss
from megatron_snm.model.presets import MODEL_PRESETS
from megatron_snm.model.transformer import FinalNorm, TransformerBlock
from tests.model_shapes import tiny

TINY = tiny(num_layers=3, hidden_size=32, seq_length=12, vocab_size=300)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(b=2, s=12, vocab=300, seed=0):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_logits_and_per_token_loss():
    model = GPTModel(GPTConfig(**TINY))
    tokens, labels = _tokens(), _tokens(seed=1)
    logits = model(tokens)
    assert logits.shape == (2, 12, 384)  # 300 padded to a multiple of 128
    loss = model(tokens, labels)
    assert loss.shape == (2, 12) and loss.dtype == torch.float32
    ref = F.cross_entropy(logits.reshape(-1, 384), labels.reshape(-1), reduction="none").view(2, 12)
    torch.testing.assert_close(loss, ref)
    mask = torch.zeros(2, 12)
    mask[0, :5] = 1
    torch.testing.assert_close(gpt_loss(logits, labels, mask), ref[0, :5].mean())
    torch.testing.assert_close(gpt_loss(logits, labels), ref.mean())


def test_causal():
    model = GPTModel(GPTConfig(**TINY))
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 300
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_model_is_its_pieces_in_sequence_and_pieces_are_deterministic():
    """Pipeline stages build only their pieces; each must equal the one GPTModel builds."""
    config = GPTConfig(**TINY)
    model = GPTModel(config)
    # Built alone, in another order, after other work that moves the global RNG:
    torch.rand(1000)
    block3, block1 = TransformerBlock(config, 3), TransformerBlock(config, 1)
    embedding, final = GPTEmbedding(config), FinalNorm(config)
    for piece, ref in ((embedding, model.embedding), (block1, model.layers[0]), (block3, model.layers[2]),
                       (final, model.final_norm)):
        for (name, p), (_, q) in zip(piece.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(p, q), name
    assert not torch.equal(block1.mlp.fc1.weight, block3.mlp.fc1.weight)
    assert not torch.equal(GPTEmbedding(GPTConfig(**TINY, seed=7)).word_embeddings.weight,
                           embedding.word_embeddings.weight)
    tokens = _tokens()
    hidden = embedding(tokens)
    for n in (1, 2, 3):
        hidden = model.layers[n - 1](hidden)
    torch.testing.assert_close(embedding.logits(final(hidden)), model(tokens))


def test_embedding_modes_compute_what_the_paper_defines():
    tokens = _tokens()
    g = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
    out, grads = {}, {}
    for mode in ("none", "layernorm", "scaled", "detach"):
        emb = GPTEmbedding(GPTConfig(**TINY, embedding_norm=mode))
        out[mode] = emb(tokens)
        (out[mode] * g).sum().backward()
        grads[mode] = (emb.word_embeddings.weight.grad, emb.position_embeddings.grad)
        table, positions = emb.word_embeddings.weight.detach(), emb.position_embeddings.detach()
    words = F.embedding(tokens, table)
    torch.testing.assert_close(out["none"], words + positions)
    torch.testing.assert_close(out["layernorm"], F.layer_norm(words + positions, (32,)))
    torch.testing.assert_close(out["scaled"], words * math.sqrt(32) + positions)
    # Embed Detach: forward unchanged, token-embedding gradient shrunk by alpha (0.1).
    torch.testing.assert_close(out["detach"], out["none"])
    torch.testing.assert_close(grads["detach"][0], 0.1 * grads["none"][0])
    torch.testing.assert_close(grads["detach"][1], grads["none"][1])


def test_scaled_embed_does_not_inflate_the_tied_logits():
    model = GPTModel(GPTConfig(**TINY, embedding_norm="scaled"))
    hidden = torch.randn(2, 12, 32)
    torch.testing.assert_close(model.embedding.logits(hidden), hidden @ model.embedding.word_embeddings.weight.t())


def test_bf16_forward_backward_close_to_fp32():
    tokens, labels = _tokens(), _tokens(seed=1)
    fp32 = GPTModel(GPTConfig(**TINY))
    bf16 = GPTModel(GPTConfig(**TINY, params_dtype=torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    loss32, loss16 = fp32(tokens, labels).mean(), bf16(tokens, labels).mean()
    assert loss16.dtype == torch.float32  # the loss is computed in fp32
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.parameters())


def _analytic_parameter_count(L, h, s, vocab, embed_ln):
    """Per block: LN 2h + QKV (3h^2 + 3h) + W_O (h^2 + h) + LN 2h + W_1 (4h^2 + 4h) + W_2 (4h^2 + h)
    = 12 h^2 + 13 h. Plus token (V_padded h) and position (s h) embeddings, the final LN (2h) and,
    with Embed LN, its LN (2h). The output layer is tied: no parameters."""
    return 12 * L * h * h + 13 * L * h + (padded_vocab_size(vocab, 1) + s) * h + 2 * h + (2 * h if embed_ln else 0)


@pytest.mark.parametrize("size", sorted(MODEL_PRESETS))
def test_presets_on_meta_device_match_the_analytic_count(size):
    shape = MODEL_PRESETS[size]
    for mode in ("layernorm", "scaled"):
        with torch.device("meta"):
            model = GPTModel(GPTConfig(**shape, vocab_size=50257, embedding_norm=mode))
        count = sum(p.numel() for p in model.parameters())
        assert all(p.is_meta for p in model.parameters())
        expected = _analytic_parameter_count(shape["num_layers"], shape["hidden_size"], shape["seq_length"],
                                             50257, mode == "layernorm")
        print(f"preset {size} ({mode}): {count:,} parameters ({count / 1e9:.3f} B); formula {expected:,}")
        assert count == expected


@pytest.mark.parametrize("overrides, tp, flag", [
    (dict(num_attention_heads=5), 1, "--num-attention-heads"),
    (dict(num_attention_heads=2, hidden_size=32), 4, "--tensor-model-parallel-size"),
    (dict(embedding_norm="rms"), 1, "--embedding-norm"),
    (dict(init_method="xavier"), 1, "--init-method"),
    (dict(hidden_dropout=1.0), 1, "--hidden-dropout"),
    (dict(embed_detach_alpha=2.0), 1, "--embed-detach-alpha"),
    (dict(num_layers=0), 1, "--num-layers"),
])
def test_bad_config_names_the_flag(overrides, tp, flag):
    with pytest.raises(ValueError, match=flag):
        GPTConfig(**{**TINY, **overrides}, tensor_parallel_size=tp).validate()


def test_bad_layer_number_and_long_sequence_are_refused():
    config = GPTConfig(**TINY)
    with pytest.raises(ValueError, match="--num-layers"):
        TransformerBlock(config, 0)
    with pytest.raises(ValueError, match="--max-position-embeddings"):
        GPTEmbedding(config)(_tokens(s=13))


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(50257, 2) == 50432
    assert padded_vocab_size(256, 2, 128) == 256
    assert GPTConfig(**TINY, make_vocab_size_divisible_by=64).padded_vocab_size == 320
