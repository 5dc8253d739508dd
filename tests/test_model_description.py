"""The model's one self-description (model/describe.py) against the modules it describes: its
parameter count equals the built model's on every rank (every embedding mode, tied and untied, TP 1
and 2, PP 1 and 2), its names and shapes are GPTModel's TP=1 state dict, its split dimensions the TP
layers', its pipeline names invert, and its FLOPs per token are GPT-2's 6N + 12 L h s."""
import itertools

import pytest
import torch
from deepspeed.runtime.utils import partition_balanced

from megatron_snm.model.config import EMBEDDING_NORMS, GPTConfig
from megatron_snm.model.describe import describe
from megatron_snm.model.gpt import GPTModel, gpt_layers
from megatron_snm.model.transformer import TransformerBlock
from megatron_snm.parallel import state
from megatron_snm.training.metrics import model_flops_per_token


def config(**overrides) -> GPTConfig:
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=500,
                max_position_embeddings=24)
    return GPTConfig(**{**base, **overrides})


@pytest.fixture
def tensor_parallel(monkeypatch):
    """Builds TP rank 0's layers of a TP size in this one process (no process group: the layers
    only ask parallel/state.py for the size and the rank)."""
    def as_size(tp: int):
        monkeypatch.setattr(state, "get_tensor_model_parallel_world_size", lambda: tp)
        monkeypatch.setattr(state, "get_tensor_model_parallel_rank", lambda: 0)
    return as_size


def stage_modules(cfg: GPTConfig, pp: int, stage: int) -> list[torch.nn.Module]:
    """The modules a rank of `stage` builds: GPTModel at PP 1; else its share of the layer list as
    DeepSpeed cuts it (partition_method type:TransformerBlock), each layer a module of its own."""
    if pp == 1:
        return [GPTModel(cfg)]
    layers = gpt_layers(cfg)
    parts = partition_balanced([int(layer.cls is TransformerBlock) for layer in layers], pp)
    return [layer.build() for layer in layers[parts[stage]:parts[stage + 1]]]


@pytest.mark.parametrize("mode,untie,tp,pp", list(itertools.product(EMBEDDING_NORMS, (False, True), (1, 2), (1, 2))))
def test_parameter_count_is_the_built_models(mode, untie, tp, pp, tensor_parallel):
    tensor_parallel(tp)
    cfg = config(embedding_norm=mode, untie_embeddings_and_output_weights=untie, tensor_parallel_size=tp)
    model = describe(cfg)
    for stage in range(pp):
        with torch.device("meta"):
            built = sum(p.numel() for m in stage_modules(cfg, pp, stage) for p in m.parameters())
        assert model.parameters(pp, stage) == built, (stage, model.stage_layers(pp, stage))
    assert model.total_parameters == sum(w.numel for w in model.weights.values())


@pytest.mark.parametrize("mode,untie", list(itertools.product(EMBEDDING_NORMS, (False, True))))
def test_names_shapes_and_splits_are_the_models(mode, untie, tensor_parallel):
    cfg = config(embedding_norm=mode, untie_embeddings_and_output_weights=untie, tensor_parallel_size=2)
    model = describe(cfg)
    with torch.device("meta"):
        whole = GPTModel(config(embedding_norm=mode, untie_embeddings_and_output_weights=untie,
                                vocab_size=cfg.padded_vocab_size))
        tensor_parallel(2)
        split = GPTModel(cfg)
    assert model.shapes() == {name: tuple(p.shape) for name, p in whole.named_parameters()}
    assert ("output.weight" in model.weights) == untie
    assert model.weights["embedding.position_embeddings"].shape == (24, 32)  # --max-position-embeddings rows
    for name, p in split.named_parameters():
        info = model.weights[name]
        assert info.split_dim == (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None), name
        assert info.local_shape(2) == tuple(p.shape), name
        layer, local = model.pipeline_layer_of(name)
        assert model.full_name_of(layer, local) == name
    tied = model.weights["embedding.word_embeddings.weight"]
    assert tied.tied == (not untie) and tied.vocabulary
    if not untie:  # the output layer's copy of the table is named by its owner's name
        assert model.full_name_of(len(model.layers) - 1, "word_embeddings.weight") == tied.name
    assert model.vocabulary_tables() == ["embedding.word_embeddings.weight"] + (["output.weight"] if untie else [])


@pytest.mark.parametrize("cfg", [config(), config(untie_embeddings_and_output_weights=True, tensor_parallel_size=2),
                                 config(num_layers=24, hidden_size=2304, num_attention_heads=24, seq_length=2048,
                                        vocab_size=50257, max_position_embeddings=2048, ffn_hidden_size=8000)])
def test_flops_per_token_is_6n_plus_12lhs(cfg):
    h, L, s, f, V = cfg.hidden_size, cfg.num_layers, cfg.seq_length, cfg.ffn_hidden_size, cfg.padded_vocab_size
    n = L * (4 * h * h + 2 * h * f) + V * h  # the blocks' matrices and the output layer's table
    assert model_flops_per_token(cfg) == describe(cfg).flops_per_token() == 6.0 * n + 12.0 * L * h * s


def test_unknown_weight_is_named():
    with pytest.raises(ValueError, match="'layers.9.mlp.fc1.weight' is not one of the model's"):
        describe(config()).split_dim("layers.9.mlp.fc1.weight")
