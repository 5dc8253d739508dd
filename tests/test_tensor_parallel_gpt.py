"""The GPT model on TP=2 equals TP=1: same seed and batch give the same loss and, once the
tensor-parallel slices are gathered, the same gradient for every parameter. For each
--embedding-norm mode, with and without activation checkpointing, and with dropout on the
replicated residual stream. All in one spawned 2-rank job."""
from dataclasses import replace

import pytest
import torch

from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.gpt import GPTModel, gpt_loss
from megatron_snm.training.monitor import StabilityMonitor
from megatron_snm.parallel import rng as tp_random, state
from megatron_snm.tensor_parallel.utils import gather_full, gather_full_like
from tests.model_shapes import batch, relative_error, tiny

TINY = tiny()
MODES = ("none", "layernorm", "scaled", "detach")
# vocab 500 pads to 512 for TP=1 (multiple of 128) and TP=2 (multiple of 256): same full table.
CASES = {f"{mode}{'+ckpt' if ckpt else ''}": dict(embedding_norm=mode, recompute_granularity="full" if ckpt else None)
         for mode in MODES for ckpt in (False, True)}
# Dropout on the residual stream draws from the default stream, identical on every TP rank, so
# TP=2 still equals TP=1 (attention dropout, on split heads, differs by design).
CASES["layernorm+ckpt+hidden_dropout"] = dict(recompute_granularity="full", hidden_dropout=0.2)
CASES["untied"] = dict(untie_embeddings_and_output_weights=True)  # the output layer's own table, split over TP
CASES["untied+scaled+ckpt"] = dict(untie_embeddings_and_output_weights=True, embedding_norm="scaled",
                                   recompute_granularity="full")
# Megatron's recompute plans against no recompute, with dropout everywhere (each must replay the masks).
RECOMPUTE = {"selective": dict(recompute_granularity="selective"),
             "uniform x2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
             "block x1": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)}
REL_TOL = 1e-5


def _run(config):
    """Loss and full gradients (gathered over TP) of one training step's forward/backward."""
    tp_random.model_parallel_seed(99)
    model = GPTModel(config)
    tokens, labels, loss_mask = batch()
    loss = gpt_loss(model(tokens), labels, loss_mask)
    loss.backward()
    weights = {n: gather_full(p).detach() for n, p in model.named_parameters()}
    grads = {n: gather_full_like(p, p.grad) for n, p in model.named_parameters()}
    return loss.item(), weights, grads


def _compare(run, ref):
    loss, weights, grads = run
    ref_loss, ref_weights, ref_grads = ref
    assert weights.keys() == ref_weights.keys()
    return {
        "loss": abs(loss - ref_loss) / abs(ref_loss),
        "weights": max(relative_error(weights[n], ref_weights[n]) for n in weights),
        "grads": max(relative_error(grads[n], ref_grads[n]) for n in grads),
        "worst_grad": max(grads, key=lambda n: relative_error(grads[n], ref_grads[n])),
        "zero_grads": [n for n, g in grads.items() if not g.abs().sum() > 0],
    }


def _monitor_figures(tp: int):
    """The stability monitor's figures; parameter-gradient norms must cover the full parameters."""
    model = GPTModel(GPTConfig(**TINY, embedding_norm="none", tensor_parallel_size=tp))
    tokens, labels, _ = batch()
    monitor = StabilityMonitor(model)
    with monitor.capture():
        model(tokens, labels).mean().backward()
    return monitor.figures()


def _tp_body(rank, world):
    torch.set_num_threads(1)
    configs = {name: GPTConfig(**TINY, **overrides) for name, overrides in CASES.items()}
    reference = {name: _run(config) for name, config in configs.items()}  # no groups yet: TP=1
    reference_figures = _monitor_figures(tp=1)
    bf16 = GPTConfig(**TINY, params_dtype=torch.bfloat16)
    reference_bf16 = _run(bf16)
    state.initialize_model_parallel(world)
    results = {name: _compare(_run(replace(config, tensor_parallel_size=world)), reference[name])
               for name, config in configs.items()}
    figures = _monitor_figures(tp=world)
    assert figures.keys() == reference_figures.keys()
    results["monitor"] = max(abs(figures[k] / reference_figures[k] - 1) for k in figures)
    bf16_loss, _, bf16_grads = _run(replace(bf16, tensor_parallel_size=world))  # bf16 collectives on gloo; only rounding may differ
    results["bf16"] = (abs(bf16_loss / reference_bf16[0] - 1),
                       max(relative_error(bf16_grads[n].float(), reference_bf16[2][n].float()) for n in bf16_grads))

    # Attention dropout on split heads: recompute must replay each rank's own masks.
    dropout = dict(TINY, hidden_dropout=0.2, attention_dropout=0.2)
    plain = _run(GPTConfig(**dropout, tensor_parallel_size=world))
    ckpt = _run(GPTConfig(**dropout, recompute_granularity="full", tensor_parallel_size=world))
    results["tp2 dropout: ckpt vs plain"] = _compare(ckpt, plain)
    for name, recompute in RECOMPUTE.items():
        results[f"tp2 dropout: {name} vs plain"] = _compare(
            _run(GPTConfig(**dropout, **recompute, tensor_parallel_size=world)), plain)
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_tp_body, 2)


@pytest.mark.parametrize("case", [*CASES, "tp2 dropout: ckpt vs plain",
                                  *(f"tp2 dropout: {name} vs plain" for name in RECOMPUTE)])
def test_tp2_equals_tp1(results, case):
    for rank, per_rank in enumerate(results):
        r = per_rank[case]
        assert r["loss"] < REL_TOL, (rank, r)
        assert r["weights"] < REL_TOL, (rank, r)
        assert r["grads"] < REL_TOL, (rank, r)
        assert not r["zero_grads"], f"parameters without gradient: {r['zero_grads']}"


def test_monitor_figures_equal_over_tp(results):
    assert all(per_rank["monitor"] < 1e-5 for per_rank in results), [r["monitor"] for r in results]


def test_bf16_tp2_close_to_tp1(results):
    for per_rank in results:
        loss_rel, grad_rel = per_rank["bf16"]
        assert loss_rel < 1e-2 and grad_rel < 5e-2, per_rank["bf16"]
