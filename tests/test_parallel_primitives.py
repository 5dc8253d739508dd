"""Each tensor-parallel primitive on 2 gloo ranks against its single-process equivalent.

All checks run in one spawned job (spawning costs seconds); each returns its max deviation.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.parallel import mappings, rng as tp_random, state
from megatron_snm.parallel.dims import ParallelDims
from megatron_snm.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_snm.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_snm.tensor_parallel.utils import gather_full, gather_full_like

TOL = 1e-5


def _seeded_init(seed):
    def init(w):
        return w.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return init


def _full_weight(shape, seed):
    return _seeded_init(seed)(torch.empty(shape))


def _diff(a, b):
    return (a - b).abs().max().item()


def _check_mappings(rank, world):
    out = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    per_rank = [torch.randn(3, 8, generator=g) for _ in range(world)]  # rank r's upstream gradient / input

    a = x.clone().requires_grad_()
    y = mappings.copy_to_tensor_model_parallel_region(a)
    (y * per_rank[rank]).sum().backward()
    out["copy.fwd"] = _diff(y, x)
    out["copy.bwd"] = _diff(a.grad, sum(per_rank))

    a = per_rank[rank].clone().requires_grad_()
    y = mappings.reduce_from_tensor_model_parallel_region(a)
    (y * x).sum().backward()
    out["reduce.fwd"] = _diff(y, sum(per_rank))
    out["reduce.bwd"] = _diff(a.grad, x)
    out["reduce.input_untouched"] = _diff(a.detach(), per_rank[rank])

    a = x.clone().requires_grad_()
    y = mappings.scatter_to_tensor_model_parallel_region(a)
    (y * per_rank[rank][:, :4]).sum().backward()
    out["scatter.fwd"] = _diff(y, x.chunk(world, -1)[rank])
    out["scatter.bwd"] = _diff(a.grad, torch.cat([p[:, :4] for p in per_rank], -1))

    a = per_rank[rank][:, :4].clone().requires_grad_()
    y = mappings.gather_from_tensor_model_parallel_region(a)
    (y * x).sum().backward()
    out["gather.fwd"] = _diff(y, torch.cat([p[:, :4] for p in per_rank], -1))
    out["gather.bwd"] = _diff(a.grad, x.chunk(world, -1)[rank])
    return out


def _check_layers(rank, world):
    out = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g)
    upstream = torch.randn(2, 5, 12, generator=g)

    for gather_output in (True, False):
        layer = ColumnParallelLinear(8, 12, init_fn=_seeded_init(10), tp_size=world, gather_output=gather_output)
        with torch.no_grad():
            layer.bias.copy_(torch.arange(12.0).chunk(world)[rank])
        w = _full_weight((12, 8), 10).requires_grad_()
        b = torch.arange(12.0).requires_grad_()
        ref = F.linear(x, w, b)
        a = x.clone().requires_grad_()
        y = layer(a)
        if not gather_output:
            y = mappings.gather_from_tensor_model_parallel_region(y)
        (y * upstream).sum().backward()
        (ref * upstream).sum().backward()
        tag = f"column.gather={gather_output}"
        out[f"{tag}.fwd"] = _diff(y, ref)
        out[f"{tag}.dx"] = _diff(a.grad, (F.linear(upstream, w.detach().t())))
        out[f"{tag}.dw"] = _diff(gather_full_like(layer.weight, layer.weight.grad), w.grad)
        out[f"{tag}.db"] = _diff(gather_full_like(layer.bias, layer.bias.grad), b.grad)
        out[f"{tag}.weight_is_slice"] = _diff(gather_full(layer.weight), w)

    upstream = torch.randn(2, 5, 6, generator=g)
    for input_is_parallel in (True, False):
        layer = RowParallelLinear(8, 6, init_fn=_seeded_init(11), tp_size=world, input_is_parallel=input_is_parallel)
        with torch.no_grad():
            layer.bias.copy_(torch.arange(6.0))
        w = _full_weight((6, 8), 11).requires_grad_()
        b = torch.arange(6.0).requires_grad_()
        ref = F.linear(x, w, b)
        a = x.clone().requires_grad_()
        y = layer(mappings.scatter_to_tensor_model_parallel_region(a) if input_is_parallel else a)
        (y * upstream).sum().backward()
        (ref * upstream).sum().backward()
        tag = f"row.input_is_parallel={input_is_parallel}"
        out[f"{tag}.fwd"] = _diff(y, ref)
        out[f"{tag}.dx"] = _diff(a.grad, F.linear(upstream, w.detach().t()))
        out[f"{tag}.dw"] = _diff(gather_full_like(layer.weight, layer.weight.grad), w.grad)
        out[f"{tag}.db"] = _diff(layer.bias.grad, b.grad)

    emb = VocabParallelEmbedding(16, 4, init_fn=_seeded_init(12), tp_size=world)
    table = _full_weight((16, 4), 12).requires_grad_()
    ids = torch.tensor([[0, 7, 8, 15, 3], [9, 9, 1, 12, 8]])
    upstream = torch.randn(2, 5, 4, generator=g)
    y = emb(ids)
    ref = F.embedding(ids, table)
    (y * upstream).sum().backward()
    (ref * upstream).sum().backward()
    out["embedding.fwd"] = _diff(y, ref)
    out["embedding.dw"] = _diff(gather_full_like(emb.weight, emb.weight.grad), table.grad)
    return out


def _check_cross_entropy(rank, world):
    out = {}
    g = torch.Generator().manual_seed(2)
    for scale in (1.0, 1000.0):  # 1000: exp() would overflow without the max shift
        logits = (torch.randn(3, 4, 16, generator=g) * scale).requires_grad_()
        target = torch.randint(0, 16, (3, 4), generator=g)
        upstream = torch.rand(3, 4, generator=g)
        ref = F.cross_entropy(logits.view(-1, 16), target.view(-1), reduction="none").view(3, 4)
        (ref * upstream).sum().backward()
        local = logits.detach().chunk(world, -1)[rank].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target)
        (loss * upstream).sum().backward()
        out[f"ce.scale={scale}.fwd"] = _diff(loss, ref) / scale
        out[f"ce.scale={scale}.bwd"] = _diff(local.grad, logits.grad.chunk(world, -1)[rank])
        out[f"ce.scale={scale}.finite"] = 0.0 if torch.isfinite(loss).all() else float("inf")
    bf16 = logits.detach().chunk(world, -1)[rank].to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(bf16, target)
    loss.sum().backward()
    out["ce.bf16.loss_is_fp32"] = 0.0 if loss.dtype == torch.float32 else 1.0
    out["ce.bf16.grad_dtype"] = 0.0 if bf16.grad.dtype == torch.bfloat16 else 1.0
    return out


def _dropout_fn(x):
    """Dropout on the default stream (replicated region) and on the tracker's (TP-split region)."""
    y = F.dropout(x, 0.5, training=True)
    with tp_random.get_rng_tracker().fork():
        return F.dropout(y * 2.0, 0.5, training=True).sin()


def _check_rng(rank, world):
    out = {}
    tp_random.model_parallel_seed(42)
    default_draw = torch.rand(64)
    with tp_random.get_rng_tracker().fork():
        tp_draw = torch.rand(64)
    default_after = torch.rand(64)
    tp_random.model_parallel_seed(42)
    expected = torch.rand(128)
    out["fork_leaves_default_stream"] = _diff(torch.cat([default_draw, default_after]), expected)

    # Activation checkpointing replays both streams: same output and gradients as without it.
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    tp_random.model_parallel_seed(7)
    a = x.clone().requires_grad_()
    y = _dropout_fn(a)
    y.sum().backward()
    tp_random.model_parallel_seed(7)
    b = x.clone().requires_grad_()
    y_ckpt = tp_random.checkpoint(_dropout_fn, b)
    torch.rand(5)  # the recompute must not depend on draws made between forward and backward
    with tp_random.get_rng_tracker().fork():
        torch.rand(5)
    y_ckpt.sum().backward()
    out["checkpoint.fwd"] = _diff(y, y_ckpt)
    out["checkpoint.bwd"] = _diff(a.grad, b.grad)
    out["checkpoint.mask_not_trivial"] = 0.0 if (a.grad == 0).any() else 1.0
    return out, default_draw, tp_draw


def _check_groups(rank, world):
    """Megatron's rank order on 2 ranks: TP=2 puts both in one TP group; PP=2 in one pipeline."""
    state.initialize_model_parallel(1, 2)
    pp = (state.get_pipeline_model_parallel_rank(), state.get_pipeline_model_parallel_ranks(),
          state.get_tensor_model_parallel_world_size(), state.is_pipeline_first_stage())
    state.destroy_model_parallel()
    state.initialize_model_parallel(2, 1)
    tp = (state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_src_rank(),
          state.get_data_parallel_world_size(), state.get_pipeline_model_parallel_world_size())
    return pp, tp


def _primitives_body(rank, world):
    torch.set_num_threads(1)
    pp, tp = _check_groups(rank, world)
    results = {}
    results.update(_check_mappings(rank, world))
    results.update(_check_layers(rank, world))
    results.update(_check_cross_entropy(rank, world))
    rng, default_draw, tp_draw = _check_rng(rank, world)
    results.update(rng)
    return results, default_draw, tp_draw, pp, tp


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_primitives_body, 2)


def test_each_primitive_matches_its_single_process_equivalent(two_ranks):
    for rank, (results, *_rest) in enumerate(two_ranks):
        bad = {k: v for k, v in results.items() if not v < TOL}
        assert not bad, f"rank {rank}: deviations above {TOL}: {bad}"
    expected_checks = {"copy.bwd", "reduce.fwd", "scatter.bwd", "gather.fwd", "column.gather=False.dw",
                       "row.input_is_parallel=True.dx", "embedding.dw", "ce.scale=1000.0.bwd", "checkpoint.bwd"}
    assert expected_checks <= set(two_ranks[0][0])


def test_rng_streams_replicated_where_needed_and_distinct_where_split(two_ranks):
    (_, default0, tp0, _, _), (_, default1, tp1, _, _) = two_ranks
    assert torch.equal(default0, default1), "default stream must agree over TP ranks"
    assert not torch.equal(tp0, tp1), "model-parallel stream must differ over TP ranks"


def test_group_layout_follows_megatron_rank_order(two_ranks):
    assert [r[3] for r in two_ranks] == [(0, [0, 1], 1, True), (1, [0, 1], 1, False)]
    assert [r[4] for r in two_ranks] == [(0, 0, 1, 1), (1, 0, 1, 1)]


def test_layers_run_as_tp1_without_groups():
    layer = ColumnParallelLinear(4, 6, init_fn=_seeded_init(5))
    assert not hasattr(layer.weight, "tensor_model_parallel")
    x = torch.randn(2, 4)
    assert torch.allclose(layer(x), F.linear(x, _full_weight((6, 4), 5)))
    logits = torch.randn(5, 10)
    target = torch.randint(0, 10, (5,))
    assert torch.allclose(vocab_parallel_cross_entropy(logits, target), F.cross_entropy(logits, target, reduction="none"))


def test_meta_device_allocates_and_initialises_nothing():
    calls = []
    with torch.device("meta"):
        layer = RowParallelLinear(1 << 16, 1 << 16, init_fn=calls.append)
    assert layer.weight.is_meta and calls == []


def test_unseeded_tracker_fails_clearly():
    tracker = tp_random.RNGStatesTracker()
    with pytest.raises(RuntimeError, match="model_parallel_seed"):
        with tracker.fork():
            pass


def test_world_not_divisible_names_the_flags():
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        ParallelDims.of_world(6, tensor=2, pipeline=2)
