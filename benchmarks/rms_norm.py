"""Forward+backward time of our fused RMSNorm against torch.nn.functional.rms_norm, on the shapes
and dtypes of the LayerNorm benchmark and with its method (benchmarks/layer_norm.py: interleaved
repeats, the median of the side-by-side ratios torch_time / our_time, a table, then a JSON line
whose "ratio" is the smallest over the shapes; on CUDA also GB/s against the device's peak).

    python benchmarks/rms_norm.py [--device cpu|cuda] [--repeats N] [--min-seconds S]
"""
import torch
import torch.nn.functional as F

from layer_norm import EPS, Norm, run  # benchmarks/layer_norm.py, beside this script

from megatron_snm.model import rms_norm


def _rms_norm_params(cols, dtype, device, gen):
    return (1 + 0.1 * torch.randn(cols, dtype=dtype, device=device, generator=gen),)


RMS_NORM = Norm(
    "RMSNorm", "rms_norm",
    lambda x, w: F.rms_norm(x, x.shape[-1:], w, EPS),
    lambda x, w: rms_norm.fused_rms_norm(x, w, EPS),
    rms_norm.backend_name, _rms_norm_params,
)

if __name__ == "__main__":
    run(RMS_NORM)
