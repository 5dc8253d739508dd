"""The fused RMSNorm (csrc/layer_norm + megatron_snm.model.rms_norm) against
torch.nn.functional.rms_norm: forward and both gradients, every supported dtype pair, awkward
shapes, both CPU instruction sets, gradcheck, the torch-compatible module interface, Megatron's
zero-centred gamma (--apply-layernorm-1p), sequence parallelism on 2 gloo ranks, the backend
choice and the errors. `pytest --cuda` adds the same checks on a GPU."""
import logging

import pytest
import torch
import torch.nn.functional as F

from megatron_snm.model import norm_backend
from megatron_snm.model import rms_norm as rms_front
from megatron_snm.model.rms_norm import FusedRMSNorm, backend_name, fused_rms_norm
from megatron_snm.parallel import state
from megatron_snm.parallel.spawn import run_distributed
from tests.norm_cases import (  # noqa: F401 (cpu_isa is a fixture)
    CUDA_SHAPES,
    DEVICES,
    DTYPE_PAIRS,
    SHAPES,
    assert_grads_match,
    cpu_ext,
    cpu_isa,
    dtype_id,
    shape_id,
)


def make_inputs(shape, dtype, param_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    # A non-zero mean and a non-unit scale: RMSNorm must not centre, and must divide by the RMS.
    x = (1.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=gen, dtype=torch.float64)).to(device, param_dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return x, weight, dy


def reference(x, weight, dy, eps=1e-5):
    """F.rms_norm and its gradients in float64 on the same (already rounded) inputs."""
    xr, wr = (t.detach().double().requires_grad_() for t in (x, weight))
    y = F.rms_norm(xr, (x.shape[-1],), wr, eps)
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad


def ours(x, weight, dy, eps=1e-5):
    x, weight = (t.detach().requires_grad_() for t in (x, weight))
    y = fused_rms_norm(x, weight, eps)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


def assert_matches(got, want, dtype, dtypes):
    assert_grads_match(("y", "dx", "dweight"), got, want, dtype, dtypes)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_cpu_matches_torch(cpu_isa, shape, dtype, param_dtype):
    x, w, dy = make_inputs(shape, dtype, param_dtype, "cpu")
    assert_matches(ours(x, w, dy), reference(x, w, dy), dtype, (dtype, dtype, param_dtype))


def test_float32_is_tight_and_rms_is_not_centred(cpu_isa):
    # A large mean: LayerNorm's centring would change y completely; the tolerance is float32's.
    x, w, dy = make_inputs((33, 517), torch.float32, torch.float32, "cpu", seed=5)
    x = x + 10.0
    got, want = ours(x, w, dy), reference(x, w, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=2e-6, atol=2e-6 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, cpu_isa):
    x, w, _ = make_inputs((4, 13), torch.float64, torch.float64, device)
    inputs = tuple(t.requires_grad_() for t in (x, w))
    assert torch.autograd.gradcheck(lambda x, w: fused_rms_norm(x, w, 1e-5), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    _, w, dy = make_inputs((40, 12), torch.float32, torch.float32, device)
    x = (1 + torch.randn(12, 40, device=device)).t()  # [40, 12] with the hidden dimension strided
    assert not x.is_contiguous()
    assert_matches(ours(x, w, dy), reference(x, w, dy), torch.float32, (torch.float32,) * 3)


@pytest.mark.parametrize("device", DEVICES)
def test_module_without_affine_and_frozen_weight(device):
    x, _, dy = make_inputs((6, 24), torch.float32, torch.float32, device)
    x.requires_grad_()
    y = FusedRMSNorm(24, elementwise_affine=False, device=device)(x)
    xr = x.detach().clone().requires_grad_()
    y_ref = F.rms_norm(xr, (24,), eps=1e-5)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)

    norm = FusedRMSNorm(24, device=device)
    norm.weight.requires_grad_(False)
    x.grad = None
    norm(x).backward(dy)
    assert norm.weight.grad is None and x.grad is not None


def test_module_matches_nn_rms_norm_and_state_dict():
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm((4, 6), eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
    mine = FusedRMSNorm((4, 6), eps=1e-6)
    assert list(mine.state_dict()) == ["weight"] == list(theirs.state_dict())
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs2 = torch.nn.RMSNorm((4, 6), eps=1e-6)
    theirs2.load_state_dict(mine.state_dict())
    torch.testing.assert_close(theirs2(x), theirs(x))
    mine.reset_parameters()
    torch.testing.assert_close(mine(x), torch.nn.RMSNorm((4, 6), eps=1e-6)(x), rtol=1e-5, atol=1e-5)


def test_zero_centered_gamma_stores_gamma_minus_one():
    # Megatron's --apply-layernorm-1p: the weight starts at 0, the norm scales by weight + 1, and
    # the stored weight's gradient is gamma's.
    norm = FusedRMSNorm(24, zero_centered_gamma=True)
    assert torch.equal(norm.weight.detach(), torch.zeros(24))
    x, gamma, dy = make_inputs((6, 24), torch.float32, torch.float32, "cpu", seed=2)
    with torch.no_grad():
        norm.weight.copy_(gamma - 1)
    x.requires_grad_()
    norm(x).backward(dy)
    y, dx, dgamma = reference(x, gamma, dy)
    torch.testing.assert_close(norm(x).double(), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.double(), dgamma, rtol=1e-5, atol=1e-5)
    assert "zero_centered_gamma=True" in repr(norm)


def _sequence_parallel_body(rank, world):
    """One TP rank's half of the sequence through FusedRMSNorm(sequence_parallel=True): its
    output is the reference's shard, and the weight gradient is the whole sequence's."""
    torch.set_num_threads(1)
    state.initialize_model_parallel(world)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, generator=gen)
    upstream = torch.randn(2, 6, 8, generator=gen)
    gamma = 1 + 0.5 * torch.randn(8, generator=gen)
    shard = slice(rank * 3, (rank + 1) * 3)
    out = {}
    for zero_centered in (False, True):
        norm = FusedRMSNorm(8, sequence_parallel=True, zero_centered_gamma=zero_centered)
        with torch.no_grad():
            norm.weight.copy_(gamma - 1 if zero_centered else gamma)
        y = norm(x[:, shard])
        (y * upstream[:, shard]).sum().backward()
        w = gamma.clone().requires_grad_()
        ref = F.rms_norm(x, (8,), w, 1e-5)
        (ref * upstream).sum().backward()
        out[zero_centered] = ((y - ref[:, shard]).abs().max().item(), (norm.weight.grad - w.grad).abs().max().item())
    return out


def test_sequence_parallel_weight_gradient_is_summed_over_tp():
    for rank, result in enumerate(run_distributed(_sequence_parallel_body, 2)):
        for zero_centered, (dy_err, dw_err) in result.items():
            assert dy_err < 1e-5 and dw_err < 1e-5, (rank, zero_centered, dy_err, dw_err)


def test_cpu_backend_is_our_kernel_and_is_logged_once(caplog):
    rms_front._backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_snm"):
        x = torch.randn(2, 8)
        fused_rms_norm(x, torch.ones(8))
        fused_rms_norm(x, torch.ones(8))
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_snm"]
    assert lines == ["RMSNorm backend for cpu tensors: fused kernels from csrc/layer_norm (megatron_snm._layer_norm)"]
    assert "csrc" in backend_name("cpu")


def test_falls_back_to_torch_without_the_extension(monkeypatch, caplog):
    real_import = norm_backend.import_optional
    monkeypatch.setattr(norm_backend, "import_optional", lambda m: None if m.startswith("megatron_snm.") else real_import(m))
    rms_front._backend.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="megatron_snm"):
            assert backend_name("cpu") == "torch.nn.functional.rms_norm"
        assert [r.getMessage() for r in caplog.records] == ["RMSNorm backend for cpu tensors: torch.nn.functional.rms_norm"]
        x, w, dy = make_inputs((5, 33), torch.float32, torch.float32, "cpu")
        assert_matches(ours(x, w, dy), reference(x, w, dy), torch.float32, (torch.float32,) * 3)
        x.requires_grad_()
        FusedRMSNorm(33, zero_centered_gamma=True)(x).backward(dy)  # the module runs on it too
        torch.testing.assert_close(x.grad.double(), reference(x, torch.ones(33), dy)[1], rtol=1e-5, atol=1e-5)
    finally:
        rms_front._backend.cache_clear()


def test_bad_input_raises_clear_errors():
    # The checks are LayerNorm's (model/norm_backend.check_input, every case in test_layer_norm.py),
    # here naming RMSNorm.
    norm = FusedRMSNorm(16)
    with pytest.raises(ValueError, match=r"RMSNorm over the last dimension\(s\) \[16\] got an input of shape \[4, 15\]"):
        norm(torch.randn(4, 15))
    with pytest.raises(TypeError, match="RMSNorm: weight is torch.bfloat16 but the input is torch.float32"):
        FusedRMSNorm(16, dtype=torch.bfloat16)(torch.randn(4, 16))
    # The extension itself refuses mismatched tensors too, naming the norm and the problem.
    with pytest.raises(RuntimeError, match="fused RMSNorm: weight of shape .* does not match the last dimension"):
        cpu_ext.rms_forward(torch.randn(4, 16), torch.ones(15), 1e-5)
    y, rstd = cpu_ext.rms_forward(torch.randn(4, 16), torch.ones(16), 1e-5)
    with pytest.raises(RuntimeError, match="fused RMSNorm: the saved statistics must be contiguous"):
        cpu_ext.rms_backward(torch.randn(4, 16), torch.randn(4, 16), rstd[:3], torch.ones(16), True)


def test_dweight_reduction_over_thread_partials():
    # Enough work for four threads, each summing an uneven share of rows into its own partial
    # dgamma before the partials are added up.
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        x, w, dy = make_inputs((3001, 64), torch.float32, torch.float32, "cpu", seed=3)
        assert_matches(ours(x, w, dy), reference(x, w, dy), torch.float32, (torch.float32,) * 3)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
def test_cuda_backend_is_our_kernel():
    assert "megatron_snm._layer_norm_cuda" in backend_name("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_cuda_matches_torch(shape, dtype, param_dtype):
    x, w, dy = make_inputs(shape, dtype, param_dtype, "cuda")
    got = ours(x, w, dy)
    torch.cuda.synchronize()
    assert_matches(got, reference(x, w, dy), dtype, (dtype, dtype, param_dtype))


@pytest.mark.cuda
def test_cuda_misaligned_weight_takes_the_scalar_path():
    x, w, dy = make_inputs((8, 256), torch.bfloat16, torch.float32, "cuda")
    w_off = torch.empty(257, dtype=w.dtype, device="cuda")[1:].copy_(w)  # 4-byte, not 32-byte aligned
    assert_matches(ours(x, w_off, dy), reference(x, w, dy), torch.bfloat16,
                   (torch.bfloat16, torch.bfloat16, torch.float32))
