"""Training throughput of our GPT: tokens/s and achieved model TFLOP/s against the machine's own
matrix-multiply rate, measured in the same run.

    python benchmarks/train_throughput.py                     # CPU: the issue's 6-layer GPT, all legs
    python benchmarks/train_throughput.py --device cuda --model-size 350m --legs bf16 \\
        --micro-batch-size 8 --steps 30 --peak-tflops 989       # one GPU (benchmarks/gpu_check.sh)

What one training step is: exactly what pretrain_gpt.py runs per iteration, minus the data loader:
`Trainer.step` of the run that `build_run` wires from the real flags (training/trainer.py: the LR,
the callbacks, the engine's step with our GPTModel in DeepSpeed's engine, ZeRO-0, torch's AdamW
with Megatron's weight-decay groups, gradient clipping to 1.0, the spike policy's gate and
verdict), one global batch of one micro-batch per data-parallel rank. The
stability monitor is off, as on the loop's ordinary steps (it captures only every
--log-stability-interval steps and after a spike).
torch.distributed is gloo on CPU, NCCL on GPU, as under the launchers.

Model FLOPs per token: 6 N + 12 L h s (training/metrics.py from model/describe.py, the figure the
training log reports; N = the blocks' matrices + the embedding table, which the tied output layer
multiplies with).
Achieved TFLOP/s = tokens/s x that.

The ceiling: F.linear (the call the model's layers make) over the model's own forward GEMM shapes
(QKV, W_O, W_1, W_2, output layer at micro-batch x seq tokens), total FLOPs over total time, in the
leg's dtype, measured just before and just after every timed step. Other processes may share the
cores, and their load comes and goes within seconds: each step is held against the GEMM rate of its
own moment, and `ratio` = the median over the fp32 steps of (step TFLOP/s / ceiling around it).
tokens/s is the best step's. The legs:
    fp32  1 process, all cores
    bf16  1 process; skipped, with the reason, where the bf16 GEMM rate is below fp32's (CPUs
          without bf16 matrix units, e.g. AVX2-only: a bf16 step would take minutes)
    tp2   2 processes, gloo, tensor parallel (cores split between them)
    dp2   2 processes, gloo, data parallel, each with its own micro-batch
Last line: one JSON object with "benchmark", "ratio" and every figure.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_snm.config import parse_args as parse_training_args, resolve
from megatron_snm.model.config import GPTConfig
from megatron_snm.model.describe import describe
from megatron_snm.model.presets import ARCHITECTURES, MODEL_PRESETS, architecture, architecture_flags
from megatron_snm.parallel import distributed, state
from megatron_snm.parallel.spawn import free_port, run_distributed
from megatron_snm.training.metrics import model_flops_per_token
from megatron_snm.training.trainer import build_run

ISSUE_SHAPE = dict(num_layers=6, hidden_size=512, num_attention_heads=8, seq_length=256)
GPT2_VOCAB = 50257
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LEGS = ("fp32", "bf16", "tp2", "dp2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model-size", choices=sorted(MODEL_PRESETS), help="a preset instead of the issue's 6-layer GPT")
    p.add_argument("--architecture", choices=ARCHITECTURES, default="gpt2",
                   help="gpt2, or llama: rotary positions, RMSNorm, SwiGLU, a key/value head per two query heads, "
                   "no biases (the FLOPs count SwiGLU's three matrices and the smaller K/V)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per step and process")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per leg")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--legs", default=None, help=f"comma-separated subset of {','.join(LEGS)} "
                   "(default: all on cpu, bf16 on cuda)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's nominal dense peak in the bf16 leg's dtype, for MFU (H200 bf16: 989)")
    args = p.parse_args(argv)
    args.legs = (args.legs or ("bf16" if args.device == "cuda" else ",".join(LEGS))).split(",")
    if unknown := set(args.legs) - set(LEGS):
        p.error(f"--legs: unknown {sorted(unknown)}; choose from {LEGS}")
    if args.device == "cuda" and ({"tp2", "dp2"} & set(args.legs)):
        p.error("--legs tp2/dp2 run on CPU processes only")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if min(args.micro_batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--micro-batch-size and --steps must be >= 1, --warmup >= 0")
    return args


def gpt_config(args, dtype: torch.dtype) -> GPTConfig:
    shape = MODEL_PRESETS[args.model_size] if args.model_size else ISSUE_SHAPE
    return GPTConfig(**shape, vocab_size=GPT2_VOCAB, init_method="small", params_dtype=dtype,
                     **architecture(args.architecture, shape["num_attention_heads"]))


# --- the ceiling -----------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class GemmCeiling:
    """The rate of F.linear over the model's forward GEMMs: QKV, W_O, W_1, W_2 and the output layer at
    `tokens` rows; one pass runs each shape once, and the rate is the pass's FLOPs over its time."""

    def __init__(self, config: GPTConfig, tokens: int, dtype, device):
        # (in, out) of the first block's matrices and the output layer's table (model/describe.py)
        model = describe(config)
        shapes = [(w.shape[1], w.shape[0]) for w in model.weights.values()
                  if w.matmul and (w.layer == 1 or w.vocabulary)]
        self.device = device
        self.operands = [(torch.randn(tokens, i, dtype=dtype, device=device),
                          torch.randn(o, i, dtype=dtype, device=device)) for i, o in shapes]
        self.flops = sum(2 * tokens * i * o for i, o in shapes)
        self.measure()  # warm-up

    def measure(self, repeats: int = 1) -> float:
        """GFLOP/s of the best of `repeats` passes."""
        best = math.inf
        for _ in range(repeats):
            _sync(self.device)
            start = time.perf_counter()
            for x, w in self.operands:
                F.linear(x, w)
            _sync(self.device)
            best = min(best, time.perf_counter() - start)
        return self.flops / best / 1e9


# --- one training step -----------------------------------------------------------------------

class TrainStep:
    """One training iteration of pretrain_gpt.py's loop (Trainer.step: LR, callbacks, engine step
    under the spike policy's gate, the verdict, the log line), with given data."""

    def __init__(self, args, precision: str, tensor_parallel: int = 1):
        shape = ["--model-size", args.model_size] if args.model_size else \
            [f"--{k.replace('_', '-')}={v}" for k, v in ISSUE_SHAPE.items()]
        heads = (MODEL_PRESETS[args.model_size] if args.model_size else ISSUE_SHAPE)["num_attention_heads"]
        flags = parse_training_args([*shape, *architecture_flags(args.architecture, heads), "--init-method", "small", "--micro-batch-size", str(args.micro_batch_size),
                                     "--train-iters", "1000000", "--lr", "1e-4", "--lr-warmup-iters", "0",
                                     "--lr-decay-style", "constant", "--zero-stage", "0",
                                     "--log-interval", "1000000",
                                     "--tensor-model-parallel-size", str(tensor_parallel),
                                     *(["--bf16"] if precision == "bf16" else [])])
        env = distributed.discover()
        self.run = resolve(flags, env.world_size)
        self.trainer = build_run(self.run, GPT2_VOCAB, env=env)

    @property
    def device(self):
        return self.trainer.engine.ds.device

    def __call__(self, tokens, labels) -> float:
        report = self.trainer.step(itertools.repeat((tokens, labels)))
        if not report.result.applied:
            raise RuntimeError(f"the engine skipped the step: {report}")
        return report.result.loss

    def close(self):
        state.destroy_model_parallel()


def time_steps(step: TrainStep, device: str, warmup: int, steps: int, seed: int = 0,
               ceiling: GemmCeiling | None = None) -> tuple[list[float], list[float]]:
    """Seconds of each timed step, on fixed random tokens (the data pipeline is not timed), and, with
    `ceiling`, the GEMM rate around each step (the mean of a pass just before and just after it), so
    each step is held against the machine as it was while the step ran."""
    g = torch.Generator().manual_seed(seed)
    micro_batch, seq = step.run.batch.micro_batch_size, step.run.model.seq_length
    data = torch.randint(0, GPT2_VOCAB, (micro_batch, seq + 1), generator=g).to(step.device)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    times, ceilings = [], []
    before = None
    for i in range(warmup + steps):
        if ceiling and i >= warmup and before is None:
            before = ceiling.measure()
        _sync(device)
        start = time.perf_counter()
        loss = step(tokens, labels)
        _sync(device)
        if not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss} at step {i}")
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if ceiling:
                after = ceiling.measure()
                ceilings.append((before + after) / 2)
                before = after
    return times, ceilings


# --- legs ----------------------------------------------------------------------------------

def single_process_leg(args, precision, ceiling: GemmCeiling) -> tuple[list[float], list[float]]:
    step = TrainStep(args, precision)
    try:
        return time_steps(step, args.device, args.warmup, args.steps, ceiling=ceiling)
    finally:
        step.close()


def _two_process_worker(rank, world, leg, args, threads):
    torch.set_num_threads(threads)
    step = TrainStep(args, "fp32", tensor_parallel=2 if leg == "tp2" else 1)
    try:
        # DP ranks get different data, TP ranks the same.
        times, _ = time_steps(step, "cpu", args.warmup, args.steps, seed=state.get_data_parallel_rank())
        return times
    finally:
        step.close()


def two_process_leg(args, leg) -> list[float]:
    threads = max(1, torch.get_num_threads() // 2)
    return run_distributed(_two_process_worker, 2, leg, args, threads, timeout=3600)[0]


# --- report --------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    fp32_config = gpt_config(args, torch.float32)
    tokens_per_step = args.micro_batch_size * fp32_config.seq_length
    flops_per_token = model_flops_per_token(fp32_config)
    print(f"model: {fp32_config.num_layers} layers, hidden {fp32_config.hidden_size}, seq {fp32_config.seq_length}, "
          f"vocab {fp32_config.padded_vocab_size}; {flops_per_token / 1e6:.1f} MFLOP/token; "
          f"{tokens_per_step} tokens/step/process; device {args.device}, {torch.get_num_threads()} threads", flush=True)

    gemms = {d: GemmCeiling(fp32_config, tokens_per_step, DTYPES[d], args.device)
             for d in sorted({leg for leg in args.legs if leg in DTYPES} | ({"fp32"} if args.device == "cpu" else set()))}
    # This process is rank 0 of 1 for the single-process legs (NCCL on GPU, gloo on CPU).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))

    results, skipped = {}, {}
    for leg in args.legs:
        if leg == "bf16" and args.device == "cpu":
            bf16_rate, fp32_rate = gemms["bf16"].measure(2), gemms["fp32"].measure(2)
            if bf16_rate < fp32_rate:
                skipped[leg] = (f"bf16 GEMMs run at {bf16_rate:.1f} GFLOP/s here, below fp32's {fp32_rate:.1f}: "
                                "no bf16 matrix hardware on this CPU")
                print(f"[{leg}] skipped: {skipped[leg]}", flush=True)
                continue
        start = time.perf_counter()
        ceilings = []
        if leg in DTYPES:
            times, ceilings = single_process_leg(args, leg, gemms[leg])
        else:
            times = two_process_leg(args, leg)
        processes_with_own_data = 2 if leg == "dp2" else 1
        rates = [processes_with_own_data * tokens_per_step / t for t in times]  # tokens/s per step
        r = results[leg] = dict(step_s=min(times), median_step_s=statistics.median(times), tokens_per_s=max(rates))
        r["tflops"] = r["tokens_per_s"] * flops_per_token / 1e12
        if ceilings:
            # Each step against the GEMM rate measured around it; the median over the steps.
            r["gemm_ceiling_tflops"] = statistics.median(ceilings) / 1e3
            r["of_ceiling"] = statistics.median(rate * flops_per_token / 1e9 / c for rate, c in zip(rates, ceilings))
        if args.peak_tflops:
            r["mfu"] = r["tflops"] / args.peak_tflops
        print(f"[{leg}] steps {[round(t, 3) for t in times]} s, GEMM ceiling around them "
              f"{[round(c, 1) for c in ceilings]} GFLOP/s ({time.perf_counter() - start:.0f} s with set-up)",
              flush=True)

    summary = {"benchmark": "train_throughput", "device": args.device, "architecture": args.architecture, "model_flops_per_token": flops_per_token,
               "tokens_per_step_per_process": tokens_per_step}
    print(f"\n{'leg':6} {'tokens/s':>10} {'TFLOP/s':>9} {'GEMM ceiling':>13} {'of ceiling':>11} "
          f"{'best step s':>12} {'median s':>9}")
    for leg, r in results.items():
        ceiling = f"{r['gemm_ceiling_tflops']:13.4f} {r['of_ceiling']:11.2f}" if "of_ceiling" in r else f"{'-':>13} {'-':>11}"
        print(f"{leg:6} {r['tokens_per_s']:10.1f} {r['tflops']:9.4f} {ceiling} {r['step_s']:12.3f} {r['median_step_s']:9.3f}"
              + (f"   MFU {r['mfu']:.3f}" if "mfu" in r else ""))
        summary[leg] = r
    print("tokens/s: the best step; of ceiling: the median over steps of each step's TFLOP/s over the GEMM rate "
          "measured around it (F.linear over the model's forward GEMM shapes)")
    if "fp32" in results:
        for leg in ("bf16", "tp2", "dp2"):
            if leg in results:
                summary[f"{leg}_vs_fp32"] = results[leg]["tokens_per_s"] / results["fp32"]["tokens_per_s"]
                print(f"{leg} / fp32 tokens/s: {summary[f'{leg}_vs_fp32']:.2f}")
    summary["skipped"] = skipped
    main_leg = "fp32" if "fp32" in results else next((leg for leg in results if leg in DTYPES), None)
    summary["ratio"] = results[main_leg]["of_ceiling"] if main_leg else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
