"""Forward+backward time of our fused LayerNorm against torch.nn.functional.layer_norm (and, through
run(), of any fused norm against its torch function: benchmarks/rms_norm.py).

Both run in this process on the same tensors, interleaved repeat by repeat so that load from
other processes hits both alike. After a warm-up, a case repeats at least --repeats times and
for at least --min-seconds; each time is the median over the repeats, and each shape's ratio the
median over the repeats of torch_time / our_time taken side by side (on a shared machine that
is steadier than a ratio of medians measured moments apart). Prints a table, then as its last
line one JSON object whose "ratio" is the smallest ratio over the shapes (higher is better).
On CUDA it also reports the achieved bandwidth: the bytes a norm must move (forward reads x and
writes y; backward reads x and dy and writes dx) over the time, against the device's peak.

    python benchmarks/layer_norm.py [--device cpu|cuda] [--repeats N] [--min-seconds S]
"""
import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megatron_snm.model import layer_norm

SHAPES = [(2048, 512), (8192, 2304), (16384, 2304)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EPS = 1e-5


@dataclass(frozen=True)
class Norm:
    """A norm to time: `torch_fn` and `ours` take (x, *params) for params made by `make_params`."""

    title: str  # "LayerNorm"
    benchmark: str  # the JSON's "benchmark"
    torch_fn: Callable
    ours: Callable
    backend_name: Callable
    make_params: Callable  # (cols, dtype, device, generator) -> tuple of parameters


def _layer_norm_params(cols, dtype, device, gen):
    weight = 1 + 0.1 * torch.randn(cols, dtype=dtype, device=device, generator=gen)
    bias = 0.1 * torch.randn(cols, dtype=dtype, device=device, generator=gen)
    return weight, bias


LAYER_NORM = Norm(
    "LayerNorm", "layer_norm",
    lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS),
    lambda x, w, b: layer_norm.fused_layer_norm(x, w, b, EPS),
    layer_norm.backend_name, _layer_norm_params,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: cpu 11, cuda 50)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per case before timing")
    p.add_argument(
        "--min-seconds", type=float, default=2.0, help="keep repeating a case until its timed runs take this long"
    )
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.repeats is None:
        args.repeats = 11 if args.device == "cpu" else 50
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def peak_bandwidth_gbps(device):
    """The device's nominal memory bandwidth from its clock and bus width (HBM transfers on both
    clock edges), or None where torch does not report them."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def copy_bandwidth_gbps(device):
    """Measured device-to-device copy bandwidth (bytes read + written per second): a practical peak."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * 20 / (time.perf_counter() - start) / 1e9


def time_fwd_bwd(norm_fn, x, params, dy, device):
    """Seconds for one forward+backward (the gradients of x and every parameter)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    y = norm_fn(x, *params)
    torch.autograd.grad(y, (x, *params), dy)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_case(norm, rows, cols, dtype, device, warmup, repeats, min_seconds):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, cols, dtype=dtype, device=device, generator=gen).requires_grad_()
    params = tuple(p.requires_grad_() for p in norm.make_params(cols, dtype, device, gen))
    dy = torch.randn(rows, cols, dtype=dtype, device=device, generator=gen)
    impls = {"torch": norm.torch_fn, "ours": norm.ours}
    for _ in range(warmup):
        for fn in impls.values():
            time_fwd_bwd(fn, x, params, dy, device)
    times = {name: [] for name in impls}
    while len(times["ours"]) < repeats or sum(times["ours"]) + sum(times["torch"]) < min_seconds:
        for name, fn in impls.items():
            times[name].append(time_fwd_bwd(fn, x, params, dy, device))
    ratio = statistics.median(t / o for t, o in zip(times["torch"], times["ours"]))
    return {name: statistics.median(ts) for name, ts in times.items()} | {"ratio": ratio}


def run(norm):
    """Times `norm` against its torch function on every shape and dtype; prints the table and the JSON."""
    args = parse_args()
    device = args.device
    print(f"{norm.title} forward+backward, device={device}, ours = {norm.backend_name(device)}")
    if device == "cpu":
        from megatron_snm import _layer_norm

        print(f"CPU threads={torch.get_num_threads()}, kernels ISA={_layer_norm.isa()}")
    peak = copy_gbps = None
    if device == "cuda":
        copy_gbps = copy_bandwidth_gbps(0)
        peak = peak_bandwidth_gbps(0) or copy_gbps
        print(f"{torch.cuda.get_device_name(0)}: nominal peak memory bandwidth {peak:.0f} GB/s, "
              f"measured copy {copy_gbps:.0f} GB/s")

    header = f"{'dtype':>9} {'shape':>12} {'torch ms':>9} {'ours ms':>9} {'ratio':>6}"
    if device == "cuda":
        header += f" {'ours GB/s':>9} {'% peak':>6}"
    print(header)
    ratios, gbps = {}, {}
    for dtype_name, dtype in DTYPES.items():
        for rows, cols in SHAPES:
            t = bench_case(norm, rows, cols, dtype, device, args.warmup, args.repeats, args.min_seconds)
            key = f"{dtype_name} {rows}x{cols}"
            ratios[key] = round(t["ratio"], 3)
            line = f"{dtype_name:>9} {rows:>5}x{cols:<6} {t['torch'] * 1e3:9.3f} {t['ours'] * 1e3:9.3f} {ratios[key]:6.2f}"
            if device == "cuda":
                moved = 5 * rows * cols * dtype.itemsize  # fwd: x in, y out; bwd: x, dy in, dx out
                gbps[key] = round(moved / t["ours"] / 1e9, 1)
                line += f" {gbps[key]:9.0f} {100 * gbps[key] / peak:6.1f}"
            print(line, flush=True)

    result = {
        "benchmark": norm.benchmark,
        "ratio": min(ratios.values()),
        "device": device,
        "ratios": ratios,
        "bf16_min_ratio": min(r for k, r in ratios.items() if k.startswith("bfloat16")),
    }
    if device == "cuda":
        result.update(gbps=gbps, peak_gbps=round(peak, 1), copy_gbps=round(copy_gbps, 1))
    print(json.dumps(result))


if __name__ == "__main__":
    run(LAYER_NORM)
