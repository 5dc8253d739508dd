"""The fused LayerNorm (csrc/layer_norm + megatron_snm.model.layer_norm) against
torch.nn.functional.layer_norm: forward and all three gradients, every supported dtype pair,
awkward shapes, both CPU instruction sets, gradcheck, the torch-compatible module interface,
the backend choice and the errors. `pytest --cuda` adds the same checks on a GPU."""
import logging

import pytest
import torch
import torch.nn.functional as F

from megatron_snm.model import layer_norm as ln_front
from megatron_snm.model import norm_backend
from megatron_snm.model.layer_norm import FusedLayerNorm, backend_name, fused_layer_norm
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
    # A mean far from zero and a non-unit std, so centring and scaling both matter.
    x = (3.0 + 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, dtype)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=gen, dtype=torch.float64)).to(device, param_dtype)
    bias = (0.5 * torch.randn(hidden, generator=gen, dtype=torch.float64)).to(device, param_dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return x, weight, bias, dy


def reference(x, weight, bias, dy, eps=1e-5):
    """F.layer_norm and its gradients in float64 on the same (already rounded) inputs."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.layer_norm(xr, (x.shape[-1],), wr, br, eps)
    y.backward(dy.double())
    return y.detach(), xr.grad, wr.grad, br.grad


def ours(x, weight, bias, dy, eps=1e-5):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = fused_layer_norm(x, weight, bias, eps)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad


def assert_matches(got, want, dtype, dtypes):
    assert_grads_match(("y", "dx", "dweight", "dbias"), got, want, dtype, dtypes)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_cpu_matches_torch(cpu_isa, shape, dtype, param_dtype):
    x, w, b, dy = make_inputs(shape, dtype, param_dtype, "cpu")
    assert_matches(ours(x, w, b, dy), reference(x, w, b, dy), dtype, (dtype, dtype, param_dtype, param_dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, cpu_isa):
    x, w, b, _ = make_inputs((4, 13), torch.float64, torch.float64, device)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: fused_layer_norm(x, w, b, 1e-5), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    _, w, b, dy = make_inputs((40, 12), torch.float32, torch.float32, device)
    x = (3 + torch.randn(12, 40, device=device)).t()  # [40, 12] with the hidden dimension strided
    assert not x.is_contiguous()
    assert_matches(ours(x, w, b, dy), reference(x, w, b, dy), torch.float32, (torch.float32,) * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_module_without_affine_and_frozen_weights(device):
    x, _, _, dy = make_inputs((6, 24), torch.float32, torch.float32, device)
    x.requires_grad_()
    y = FusedLayerNorm(24, elementwise_affine=False, device=device)(x)
    xr = x.detach().clone().requires_grad_()
    y_ref = F.layer_norm(xr, (24,), eps=1e-5)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)

    norm = FusedLayerNorm(24, device=device)
    norm.weight.requires_grad_(False)
    x.grad = None
    norm(x).backward(dy)
    assert norm.weight.grad is None and norm.bias.grad is not None and x.grad is not None


def test_module_matches_nn_layer_norm_and_state_dict():
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm((4, 6), eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    mine = FusedLayerNorm((4, 6), eps=1e-6)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-5, atol=1e-5)
    # ...and back: a checkpoint of ours loads into torch's module.
    theirs2 = torch.nn.LayerNorm((4, 6), eps=1e-6)
    theirs2.load_state_dict(mine.state_dict())
    torch.testing.assert_close(theirs2(x), theirs(x))
    mine.reset_parameters()
    torch.testing.assert_close(mine(x), torch.nn.LayerNorm((4, 6), eps=1e-6)(x), rtol=1e-5, atol=1e-5)


def test_zero_centered_gamma_stores_gamma_minus_one():
    # Megatron's --apply-layernorm-1p: the weight starts at 0, the norm scales by weight + 1, and
    # the stored weight's gradient is gamma's.
    norm = FusedLayerNorm(24, zero_centered_gamma=True)
    assert torch.equal(norm.weight.detach(), torch.zeros(24)) and torch.equal(norm.bias.detach(), torch.zeros(24))
    x, gamma, beta, dy = make_inputs((6, 24), torch.float32, torch.float32, "cpu", seed=2)
    with torch.no_grad():
        norm.weight.copy_(gamma - 1)
        norm.bias.copy_(beta)
    x.requires_grad_()
    y = norm(x)
    y.backward(dy)
    want = reference(x, gamma, beta, dy)
    assert_matches((y.detach(), x.grad, norm.weight.grad, norm.bias.grad), want, torch.float32, (torch.float32,) * 4)
    assert "zero_centered_gamma=True" in repr(norm)


def test_cpu_backend_is_our_kernel_and_is_logged_once(caplog):
    ln_front._backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="megatron_snm"):
        x = torch.randn(2, 8)
        fused_layer_norm(x, torch.ones(8), torch.zeros(8))
        fused_layer_norm(x, torch.ones(8), torch.zeros(8))
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_snm"]
    assert lines == ["LayerNorm backend for cpu tensors: fused kernels from csrc/layer_norm (megatron_snm._layer_norm)"]
    assert "csrc" in backend_name("cpu")


def test_falls_back_to_torch_without_the_extension(monkeypatch):
    real_import = norm_backend.import_optional
    monkeypatch.setattr(norm_backend, "import_optional", lambda m: None if m.startswith("megatron_snm.") else real_import(m))
    ln_front._backend.cache_clear()
    try:
        assert backend_name("cpu") == "torch.nn.functional.layer_norm"
        x, w, b, dy = make_inputs((5, 33), torch.float32, torch.float32, "cpu")
        assert_matches(ours(x, w, b, dy), reference(x, w, b, dy), torch.float32, (torch.float32,) * 4)
    finally:
        ln_front._backend.cache_clear()


def test_bad_input_raises_clear_errors():
    norm = FusedLayerNorm(16)
    with pytest.raises(ValueError, match=r"last dimension\(s\) \[16\] got an input of shape \[4, 15\]"):
        norm(torch.randn(4, 15))
    with pytest.raises(TypeError, match="unsupported input dtype torch.int64"):
        norm(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="weight is torch.bfloat16 but the input is torch.float32"):
        FusedLayerNorm(16, dtype=torch.bfloat16)(torch.randn(4, 16))
    with pytest.raises(TypeError, match="weight is torch.float32 but the input is torch.float64"):
        norm(torch.randn(4, 16, dtype=torch.float64))
    # The extension itself refuses mismatched tensors too, naming the problem.
    with pytest.raises(RuntimeError, match="does not match the last dimension"):
        cpu_ext.forward(torch.randn(4, 16), torch.ones(15), torch.zeros(15), 1e-5)
    with pytest.raises(RuntimeError, match="not supported by this CPU|unknown"):
        cpu_ext.set_isa("avx512")


def test_dweight_reduction_over_thread_partials():
    # Enough work for four threads, each summing an uneven share of rows into its own partial
    # dgamma/dbeta before the partials are added up.
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        x, w, b, dy = make_inputs((3001, 64), torch.float32, torch.float32, "cpu", seed=3)
        assert_matches(ours(x, w, b, dy), reference(x, w, b, dy), torch.float32, (torch.float32,) * 4)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cuda
def test_cuda_backend_is_our_kernel():
    assert "megatron_snm._layer_norm_cuda" in backend_name("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=dtype_id)
def test_cuda_matches_torch(shape, dtype, param_dtype):
    x, w, b, dy = make_inputs(shape, dtype, param_dtype, "cuda")
    got = ours(x, w, b, dy)
    torch.cuda.synchronize()
    assert_matches(got, reference(x, w, b, dy), dtype, (dtype, dtype, param_dtype, param_dtype))


@pytest.mark.cuda
def test_cuda_misaligned_parameters_take_the_scalar_path():
    x, w, b, dy = make_inputs((8, 256), torch.bfloat16, torch.float32, "cuda")
    w_off = torch.empty(257, dtype=w.dtype, device="cuda")[1:].copy_(w)  # 4-byte, not 32-byte aligned
    b_off = torch.empty(257, dtype=b.dtype, device="cuda")[1:].copy_(b)
    assert_matches(ours(x, w_off, b_off, dy), reference(x, w, b, dy), torch.bfloat16,
                   (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32))
