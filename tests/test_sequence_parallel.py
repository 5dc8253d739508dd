"""--sequence-parallel (Megatron's): the sequence-parallel collectives and layers on 2 gloo ranks
against their single-process equivalents, and the GPT on TP=2 with it against TP=2 without it (the
same loss, every parameter's full gradient and the stability monitor's figures, rel 1e-5), for each
--embedding-norm mode and recompute plan. Dropout draws different masks on a different sharding,
so the equality cases have none; with dropout, recompute must still replay each rank's masks.
The training loop with it is in test_training_parallel.py, its memory in test_memory.py."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_snm.config import ConfigError, build_parser, parse_args, resolve
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel, gpt_loss
from megatron_snm.parallel import mappings, rng as tp_random, state
from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    sequence_parallel_parameter,
)
from megatron_snm.tensor_parallel.utils import gather_full, gather_full_like
from megatron_snm.training.monitor import StabilityMonitor
from tests.model_shapes import batch, relative_error, tiny

TOL = 1e-5
REL_TOL = 1e-5


def _diff(a, b):
    return (a - b).abs().max().item()


def _seeded_init(seed):
    def init(w):
        return w.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return init


# --- the collectives and the layers ------------------------------------------------------------
def _check_mappings(rank, world):
    """[b, s, h] tensors split along s (dim 1), as the layers use them."""
    out = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g)
    per_rank = [torch.randn(2, 6, 3, generator=g) for _ in range(world)]  # rank r's full-size input / gradient
    shard = slice(rank * 3, (rank + 1) * 3)

    a = x.clone().requires_grad_()
    y = mappings.scatter_to_sequence_parallel_region(a, dim=1)
    (y * per_rank[rank][:, shard]).sum().backward()
    out["sp_scatter.fwd"] = _diff(y, x[:, shard])
    out["sp_scatter.bwd"] = _diff(a.grad, torch.cat([p[:, r * 3:(r + 1) * 3] for r, p in enumerate(per_rank)], 1))

    a = per_rank[rank][:, shard].clone().requires_grad_()
    y = mappings.gather_from_sequence_parallel_region(a, dim=1)
    (y * per_rank[rank]).sum().backward()
    out["sp_gather.fwd"] = _diff(y, torch.cat([p[:, r * 3:(r + 1) * 3] for r, p in enumerate(per_rank)], 1))
    out["sp_gather.bwd"] = _diff(a.grad, sum(per_rank)[:, shard])  # reduce-scatter of the ranks' gradients

    a = per_rank[rank].clone().requires_grad_()
    y = mappings.reduce_scatter_to_sequence_parallel_region(a, dim=1)
    upstream = [p.flip(1)[:, :3] for p in per_rank]  # rank r's gradient of its shard
    (y * upstream[rank]).sum().backward()
    out["sp_reduce_scatter.fwd"] = _diff(y, sum(per_rank)[:, shard])
    out["sp_reduce_scatter.bwd"] = _diff(a.grad, torch.cat(upstream, 1))
    out["sp_reduce_scatter.input_untouched"] = _diff(a.detach(), per_rank[rank])

    p = x[0].clone().requires_grad_()  # a replicated parameter used on this rank's shard only
    (sequence_parallel_parameter(p) * per_rank[rank][0]).sum().backward()
    out["sp_parameter.grad_summed"] = _diff(p.grad, sum(per_rank)[0])
    return out


def _check_layers(rank, world):
    out = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, generator=g)
    shard = slice(rank * 3, (rank + 1) * 3)

    upstream = torch.randn(2, 6, 12, generator=g)
    layer = ColumnParallelLinear(8, 12, init_fn=_seeded_init(10), tp_size=world, sequence_parallel=True)
    w = _seeded_init(10)(torch.empty(12, 8)).requires_grad_()
    b = torch.zeros(12).requires_grad_()
    ref = F.linear(x, w, b)
    a = x[:, shard].clone().requires_grad_()
    y = mappings.gather_from_tensor_model_parallel_region(layer(a))
    (y * upstream).sum().backward()
    (ref * upstream).sum().backward()
    out["sp_column.fwd"] = _diff(y, ref)
    out["sp_column.dx"] = _diff(a.grad, F.linear(upstream, w.detach().t())[:, shard])
    out["sp_column.dw"] = _diff(gather_full_like(layer.weight, layer.weight.grad), w.grad)
    out["sp_column.db"] = _diff(gather_full_like(layer.bias, layer.bias.grad), b.grad)

    upstream = torch.randn(2, 6, 5, generator=g)
    layer = RowParallelLinear(8, 5, init_fn=_seeded_init(11), tp_size=world, input_is_parallel=True,
                              sequence_parallel=True)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(5.0))
    w = _seeded_init(11)(torch.empty(5, 8)).requires_grad_()
    b = torch.arange(5.0).requires_grad_()
    ref = F.linear(x, w, b)
    a = x.clone().requires_grad_()
    y = layer(mappings.scatter_to_tensor_model_parallel_region(a))
    (y * upstream[:, shard]).sum().backward()
    (ref * upstream).sum().backward()
    out["sp_row.fwd"] = _diff(y, ref[:, shard])
    out["sp_row.dx"] = _diff(a.grad, F.linear(upstream, w.detach().t()))
    out["sp_row.dw"] = _diff(gather_full_like(layer.weight, layer.weight.grad), w.grad)
    out["sp_row.db"] = _diff(layer.bias.grad, b.grad)  # the replicated bias: the whole sequence's gradient

    emb = VocabParallelEmbedding(16, 4, init_fn=_seeded_init(12), tp_size=world, sequence_parallel=True)
    table = _seeded_init(12)(torch.empty(16, 4)).requires_grad_()
    ids = torch.tensor([[0, 7, 8, 15, 3, 2], [9, 9, 1, 12, 8, 0]])
    upstream = torch.randn(2, 6, 4, generator=g)
    y = emb(ids)
    ref = F.embedding(ids, table)
    (y * upstream[:, shard]).sum().backward()
    (ref * upstream).sum().backward()
    out["sp_embedding.fwd"] = _diff(y, ref[:, shard])
    out["sp_embedding.dw"] = _diff(gather_full_like(emb.weight, emb.weight.grad), table.grad)
    return out


# --- the model ---------------------------------------------------------------------------------
TINY = tiny()
MODES = ("none", "layernorm", "scaled", "detach")
CASES = {mode: dict(embedding_norm=mode) for mode in MODES}
CASES.update({
    "layernorm+full": dict(recompute_granularity="full"),
    "scaled+full uniform x2": dict(embedding_norm="scaled", recompute_granularity="full", recompute_num_layers=2),
    "layernorm+full block": dict(recompute_granularity="full", recompute_method="block"),
    "layernorm+selective": dict(recompute_granularity="selective"),
    "untied+scaled": dict(untie_embeddings_and_output_weights=True, embedding_norm="scaled"),
})


def _run(config):
    """Loss, full gradients (gathered over TP) and the monitor's figures of one forward/backward."""
    tp_random.model_parallel_seed(99)
    model = GPTModel(config)
    tokens, labels, loss_mask = batch()
    monitor = StabilityMonitor(model)
    with monitor.capture():
        loss = gpt_loss(model(tokens), labels, loss_mask)
        loss.backward()
    grads = {n: gather_full_like(p, p.grad) for n, p in model.named_parameters()}
    weights = {n: gather_full(p).detach() for n, p in model.named_parameters()}
    return loss.item(), weights, grads, monitor.figures()


def _compare(run, ref):
    (loss, weights, grads, figures), (ref_loss, ref_weights, ref_grads, ref_figures) = run, ref
    assert grads.keys() == ref_grads.keys() and figures.keys() == ref_figures.keys()
    return {
        "loss": abs(loss - ref_loss) / abs(ref_loss),
        "weights": max(relative_error(weights[n], ref_weights[n]) for n in weights),
        "grads": max(relative_error(grads[n], ref_grads[n]) for n in grads),
        "worst_grad": max(grads, key=lambda n: relative_error(grads[n], ref_grads[n])),
        "zero_grads": [n for n, g in grads.items() if not g.abs().sum() > 0],
        "monitor": max(abs(figures[k] - ref_figures[k]) / max(abs(ref_figures[k]), 1e-12) for k in figures),
        "figures": len(figures),
    }


def _body(rank, world):
    torch.set_num_threads(1)
    state.initialize_model_parallel(world)
    results = _check_mappings(rank, world)
    results.update(_check_layers(rank, world))
    shard_shape = GPTModel(GPTConfig(**TINY, tensor_parallel_size=world, sequence_parallel=True)).embedding(
        batch()[0]).shape
    for name, overrides in CASES.items():
        tp = GPTConfig(**TINY, **overrides, tensor_parallel_size=world)
        results[name] = _compare(_run(replace(tp, sequence_parallel=True)), _run(tp))
    # With dropout the masks differ from TP without SP by design; recompute must replay them exactly.
    dropout = GPTConfig(**TINY, hidden_dropout=0.2, attention_dropout=0.2, tensor_parallel_size=world,
                        sequence_parallel=True)
    plain = _run(dropout)
    for name, recompute in {"full": dict(recompute_granularity="full"),
                            "selective": dict(recompute_granularity="selective")}.items():
        results[f"dropout: {name} vs plain"] = _compare(_run(replace(dropout, **recompute)), plain)
    results["dropout: differs from no SP"] = abs(plain[0] - _run(replace(dropout, sequence_parallel=False))[0])
    bf16 = GPTConfig(**TINY, params_dtype=torch.bfloat16, tensor_parallel_size=world)  # bf16 collectives on gloo
    results["bf16"] = _compare(_run(replace(bf16, sequence_parallel=True)), _run(bf16))
    return results, tuple(shard_shape)


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_body, 2)


def test_sequence_parallel_primitives_match_their_definitions(two_ranks):
    for rank, (results, _) in enumerate(two_ranks):
        checks = {k: v for k, v in results.items() if k.startswith("sp_")}
        assert len(checks) == 18
        bad = {k: v for k, v in checks.items() if not v < TOL}
        assert not bad, f"rank {rank}: deviations above {TOL}: {bad}"


def test_embedding_output_is_the_sequence_shard(two_ranks):
    assert [shape for _, shape in two_ranks] == [(2, 8, 64), (2, 8, 64)]


@pytest.mark.parametrize("case", [*CASES, "dropout: full vs plain", "dropout: selective vs plain"])
def test_sequence_parallel_equals_tp_without_it(two_ranks, case):
    for rank, (results, _) in enumerate(two_ranks):
        r = results[case]
        assert r["loss"] < REL_TOL and r["weights"] < REL_TOL and r["grads"] < REL_TOL, (rank, r)
        assert not r["zero_grads"], f"parameters without gradient: {r['zero_grads']}"
        assert r["monitor"] < REL_TOL and r["figures"] > 20, (rank, r)


def test_bf16_sequence_parallel_close_to_tp_without_it(two_ranks):
    """Only rounding may differ (the reductions sum in another order)."""
    for results, _ in two_ranks:
        r = results["bf16"]
        assert r["loss"] < 1e-2 and r["grads"] < 5e-2 and not r["zero_grads"], r


def test_dropout_under_sequence_parallel_draws_per_shard_masks(two_ranks):
    """The same model and data with dropout gives another loss with SP: its masks come from the
    TP-rank stream (on SP's shards), not the replicated one."""
    assert all(results["dropout: differs from no SP"] > 1e-4 for results, _ in two_ranks)


# --- configuration -----------------------------------------------------------------------------
ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--train-iters", "1", "--micro-batch-size", "1"]


def test_flag_is_listed_in_help():
    text = build_parser().format_help()
    assert "--sequence-parallel" in text and "split along the sequence" in " ".join(text.split())


def test_turned_off_with_a_note_at_tp1():
    run = resolve(parse_args(ARGS + ["--sequence-parallel"]), 2)
    assert run.parallel.sequence_parallel is False and not run.model_config(500).sequence_parallel
    assert any(note.startswith("--sequence-parallel has no effect") for note in run.notes)


def test_reaches_the_model_with_tp2():
    run = resolve(parse_args(ARGS + ["--sequence-parallel", "--tensor-model-parallel-size", "2"]), 2)
    assert run.model_config(500).sequence_parallel and run.as_dict()["sequence_parallel"] is True
    assert run.deepspeed["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    assert not resolve(parse_args(ARGS + ["--tensor-model-parallel-size", "2"]), 2).model_config(500).sequence_parallel


def test_refused_when_the_sequence_does_not_split_over_tp():
    argv = ARGS + ["--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "18",
                   "--num-attention-heads", "4"]
    with pytest.raises(ConfigError, match=r"--sequence-parallel .*--seq-length \(18\) must be divisible by "
                                          r"--tensor-model-parallel-size \(4\)"):
        resolve(parse_args(argv), 4)
