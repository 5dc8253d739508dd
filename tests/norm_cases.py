"""What the fused-norm tests (test_layer_norm.py, test_rms_norm.py) share: the dtype pairs and
shapes they cover, the tolerance per dtype, and the fixture that runs a test under each CPU
instruction set the kernels can use."""
import pytest

torch = pytest.importorskip("torch")
cpu_ext = pytest.importorskip("megatron_snm._layer_norm", reason="build the extensions: python setup.py build_ext --inplace")

# (input dtype, parameter dtype)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
# A 1-D input, one row, a single column, hidden sizes that leave vector tails, a 3-D input, a wide row.
SHAPES = [(16,), (1, 64), (3, 1), (7, 37), (16, 127), (5, 1023), (2, 3, 40), (9, 2304)]
# Also on the GPU: many rows (grid-stride and many dgamma partials), a hidden size whose
# accumulators need opted-in shared memory, and an odd one that takes the scalar path.
CUDA_SHAPES = SHAPES + [(5000, 512), (300, 12288), (64, 4101)]
# (rtol, atol) for outputs rounded to each dtype; the statistics are float32 throughout.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (4e-3, 4e-3),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def shape_id(shape):
    return "x".join(map(str, shape))


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def cpu_isas():
    isas = ["generic"]
    try:
        cpu_ext.set_isa("avx2")
        isas.append("avx2")
    except RuntimeError:
        pass  # this CPU lacks AVX2/FMA/F16C
    return isas


@pytest.fixture(params=cpu_isas())
def cpu_isa(request):
    previous = cpu_ext.isa()
    cpu_ext.set_isa(request.param)
    yield request.param
    cpu_ext.set_isa(previous)


def assert_grads_match(names, got, want, dtype, dtypes):
    """Each of `got` (ours) close to `want` (a float64 reference) at `dtype`'s tolerance, with the
    dtype in `dtypes`; parameter gradients (names starting "dw"/"db") are sums over rows, so their
    tolerance scales with their size."""
    rtol, atol = TOLERANCE[dtype]
    for name, g, w, expected_dtype in zip(names, got, want, dtypes):
        assert g.dtype == expected_dtype, f"{name} is {g.dtype}, expected {expected_dtype}"
        scale = max(1.0, w.abs().max().item()) if name.startswith(("dw", "db")) else 1.0
        torch.testing.assert_close(g.double().cpu(), w.cpu(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")
