"""Learning-rate sweeps through the real trainer: where does each embedding mode spike or diverge?

Runs the product of the grid axes (--embedding-norm x --lr x --seed x --sigma x --num-layers x
--lr-warmup-iters x --adam-beta2 x --clip-grad) as short pre-training runs of `pretrain_gpt.py`
itself, one process each (the same engine, flags and logs users get), --jobs at a time, with a
progress bar and ETA over the grid. Resumable: a run whose result.json exists is not run again
(one with a changed command is rerun; a finished one is judged again under the current spike
rules). Each run keeps DIR/runs/NAME/{command.txt, train.log,
tensorboard/, result.json}; the sweep writes DIR/summary.json (a list, one object per run) and
DIR/summary.csv after every run.

    python tools/stability_sweep.py --data-path data/c4_text_document \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model sp.model --output-dir sweeps/lr \
        --embedding-norm none layernorm scaled --lr 1e-3 1e-2 3e-2 --seed 1 2
    python tools/stability_sweep.py ... --quick    # a 4-run grid of tiny models, ~1 minute

Rules (megatron_snm/analysis/run_history.py): a loss spike is a step whose training loss exceeds
--spike-factor (1.5) x the mean of the previous --spike-window (20) steps (at least 5); a grad-norm spike the
same for the global gradient norm with --grad-spike-factor (4); a run diverged when a loss or
gradient norm was non-finite, the trainer stopped it, or its final loss (mean of the last window)
is above its first step's. The largest gradient norm is attributed to the embedding, the blocks or
the final LayerNorm (whichever holds the largest share of its square) from the monitor's per-module norms (--log-stability-interval) at the captured step with the
largest global norm.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_snm.model.config import EMBEDDING_NORMS
from megatron_snm.analysis.run_history import RunHistory, SpikeRules, stability_verdict
from megatron_snm.model.presets import ARCHITECTURES, architecture_flags

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_gpt.py"

# The default grid: 12 runs of a d=128, 6-layer model, 25-60 minutes on the 2-core CI machine
# (depending on who else uses it). sigma is the 1.7B model's 0.0132 rather than small init's
# sqrt(2/(5d)) = 0.056 at d=128, so the embedding's std (and the shallow LayerNorms' 1/std
# amplification) is that of a large model.
DEFAULTS = dict(embedding_norm=["none", "layernorm", "scaled"], lr=[1e-3, 3e-3, 1e-2, 3e-2], seed=[1],
                sigma=["0.0132"], num_layers=[6], lr_warmup_iters=[10], adam_beta2=[0.999], clip_grad=[1.0],
                hidden_size=128, seq_length=128, batch_size=8, train_iters=250, eval_interval=50, eval_iters=8,
                log_interval=10, log_stability_interval=5, split="980,20,0")
# --quick: 4 runs of a 2-layer d=32 model, a sane learning rate and a deliberately unstable one.
QUICK = dict(embedding_norm=["none", "layernorm"], lr=[3e-3, 1.0], clip_grad=[0.0], sigma=["small"], num_layers=[2], hidden_size=32,
             seq_length=32, batch_size=4, train_iters=30, eval_interval=10, eval_iters=2, log_interval=5,
             log_stability_interval=5, lr_warmup_iters=[0], split="80,20,0")

SUMMARY_FIELDS = ["name", "embedding_norm", "lr", "seed", "sigma", "num_layers", "lr_warmup_iters", "adam_beta2",
                  "clip_grad", "architecture", "status", "diverged", "diverged_reason", "loss_spikes", "grad_norm_spikes",
                  "max_grad_norm", "max_grad_norm_step", "max_captured_grad_norm", "max_captured_grad_norm_step",
                  "max_grad_norm_source", "max_captured_embedding_grad_share", "max_captured_final_norm_grad_share",
                  "mean_embedding_grad_share", "first_loss", "final_train_loss", "best_valid_loss", "best_valid_ppl",
                  "final_valid_loss", "final_valid_ppl", "tokens_per_s", "wall_s"]


@dataclass(frozen=True)
class Point:
    embedding_norm: str
    lr: float
    seed: int
    sigma: str
    num_layers: int
    lr_warmup_iters: int
    adam_beta2: float
    clip_grad: float
    architecture: str = "gpt2"

    @property
    def name(self) -> str:
        return (f"{'' if self.architecture == 'gpt2' else self.architecture + '_'}{self.embedding_norm}_lr{self.lr:g}_seed{self.seed}_sigma{self.sigma}_L{self.num_layers}"
                f"_wu{self.lr_warmup_iters}_b2{self.adam_beta2:g}_clip{self.clip_grad:g}")


def free_port() -> int:
    """Each single-process run starts its own torch.distributed store; parallel runs need their own port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: argparse.Namespace, point: Point, run_dir: Path) -> list[str]:
    init = ["--init-method", "small"] if point.sigma == "small" else ["--init-method", "normal",
                                                                       "--init-method-std", point.sigma]
    tokenizer = [flag for flag, value in (("--tokenizer-type", args.tokenizer_type), ("--vocab-file", args.vocab_file),
                                          ("--merge-file", args.merge_file), ("--tokenizer-model", args.tokenizer_model))
                 if value for flag in (flag, value)]
    return [
        sys.executable, str(PRETRAIN),
        "--num-layers", str(point.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(max(1, args.hidden_size // 64)), "--seq-length", str(args.seq_length),
        *init, "--embedding-norm", point.embedding_norm, "--seed", str(point.seed),
        "--micro-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size),
        "--train-iters", str(args.train_iters), "--lr", f"{point.lr:g}", "--lr-warmup-iters", str(point.lr_warmup_iters),
        "--lr-decay-style", "cosine", "--adam-beta2", f"{point.adam_beta2:g}", "--clip-grad", f"{point.clip_grad:g}",
        "--data-path", *args.data_path, "--split", args.split, "--data-cache-path", str(args.output_dir / "index-cache"),
        *tokenizer, *architecture_flags(point.architecture, max(1, args.hidden_size // 64)),
        "--log-interval", str(args.log_interval), "--eval-interval", str(args.eval_interval),
        "--eval-iters", str(args.eval_iters), "--log-stability-interval", str(args.log_stability_interval),
        "--tensorboard-dir", str(run_dir / "tensorboard"),
        *shlex.split(args.extra_args),
    ]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def finished(run_dir: Path, cmd: list[str]) -> dict | None:
    try:
        result = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("command") == shlex.join(cmd) else None


def start(args, point: Point, run_dir: Path, cmd: list[str]):
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished or outdated run starts again from scratch
    run_dir.mkdir(parents=True)
    write_atomic(run_dir / "command.txt", shlex.join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process each, whatever launched the sweep
        env.pop(var, None)
    log = open(run_dir / "train.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.perf_counter()


def collect(args, point: Point, run_dir: Path, cmd: list[str], status: int, wall: float) -> dict:
    history = RunHistory.read(str(run_dir / "train.log"), str(run_dir / "tensorboard"))
    result = dict(name=point.name, **point.__dict__, status={0: "done", 3: "stopped"}.get(status, f"failed ({status})"),
                  exit_status=status, **stability_verdict(history, args.rules, status), wall_s=round(wall, 1),
                  command=shlex.join(cmd))
    write_atomic(run_dir / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def write_summary(output_dir: Path, results: list[dict]) -> None:
    write_atomic(output_dir / "summary.json", json.dumps(results, indent=1) + "\n")
    tmp = output_dir / "summary.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    os.replace(tmp, output_dir / "summary.csv")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: list[dict]) -> None:
    print(f"\n{'run':58s} {'diverged':>8s} {'spikes':>6s} {'gn spk':>6s} {'max |g|':>8s} {'from':>9s}"
          f" {'emb share':>9s} {'best ppl':>9s} {'final ppl':>9s} {'tok/s':>7s}")
    for r in results:
        print(f"{r['name']:58s} {str(r['diverged']):>8s} {r['loss_spikes']:6d} {r['grad_norm_spikes']:6d}"
              f" {_fmt(r['max_grad_norm'], '8.3g')} {r['max_grad_norm_source'] or '-':>9s}"
              f" {_fmt(r['mean_embedding_grad_share'], '9.2f')} {_fmt(r['best_valid_ppl'], '9.1f')}"
              f" {_fmt(r['final_valid_ppl'], '9.1f')} {_fmt(r['tokens_per_s'], '7.0f')}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, help="as pretrain_gpt.py's: PREFIX or W1 P1 W2 P2 ...")
    p.add_argument("--tokenizer-type", required=True)
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="a 4-run grid of tiny models (the test's), ~1 minute")
    grid = p.add_argument_group("grid axes (the sweep runs their product)")
    grid.add_argument("--embedding-norm", nargs="+", choices=EMBEDDING_NORMS)
    grid.add_argument("--lr", nargs="+", type=float)
    grid.add_argument("--seed", nargs="+", type=int)
    grid.add_argument("--sigma", nargs="+", help="'small' (--init-method small) or fixed stds, e.g. 0.0132")
    grid.add_argument("--num-layers", nargs="+", type=int)
    grid.add_argument("--lr-warmup-iters", nargs="+", type=int)
    grid.add_argument("--adam-beta2", nargs="+", type=float)
    grid.add_argument("--clip-grad", nargs="+", type=float, help="0: no clipping")
    grid.add_argument("--architecture", nargs="+", choices=ARCHITECTURES, default=["gpt2"],
                      help="gpt2 and/or llama (rotary, RMSNorm, SwiGLU, query groups, no biases)")
    fixed = p.add_argument_group("the same for every run")
    fixed.add_argument("--hidden-size", type=int)
    fixed.add_argument("--seq-length", type=int)
    fixed.add_argument("--batch-size", type=int, help="global = micro batch (one process, no accumulation)")
    fixed.add_argument("--train-iters", type=int)
    fixed.add_argument("--eval-interval", type=int, help="should divide --train-iters (the final validation)")
    fixed.add_argument("--eval-iters", type=int)
    fixed.add_argument("--log-interval", type=int)
    fixed.add_argument("--log-stability-interval", type=int, help="the monitor's interval (gradient attribution)")
    fixed.add_argument("--split", help="train,valid,test proportions of the documents")
    fixed.add_argument("--extra-args", default="", help="more pretrain_gpt.py flags for every run, one string")
    run = p.add_argument_group("running")
    run.add_argument("--jobs", type=int, default=1, help="runs at a time")
    run.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    run.add_argument("--spike-factor", type=float, default=1.5)
    run.add_argument("--grad-spike-factor", type=float, default=4.0)
    run.add_argument("--spike-window", type=int, default=20)
    args = p.parse_args(argv)
    defaults = dict(DEFAULTS, **QUICK) if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("hidden_size", "seq_length", "batch_size", "train_iters", "eval_interval", "log_interval",
                "jobs", "threads", "spike_window"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    for value in args.sigma:
        try:
            ok = value == "small" or float(value) > 0
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--sigma: {value!r} is neither 'small' nor a positive number")
    if args.train_iters % args.eval_interval:
        p.error(f"--eval-interval {args.eval_interval} does not divide --train-iters {args.train_iters}: "
                "the final validation would be missing")
    args.rules = SpikeRules(args.spike_factor, args.grad_spike_factor, args.spike_window)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    points = [Point(*values) for values in itertools.product(
        args.embedding_norm, args.lr, args.seed, args.sigma, args.num_layers, args.lr_warmup_iters, args.adam_beta2,
        args.clip_grad, args.architecture)]
    results: dict[str, dict] = {}
    pending = []
    for point in points:
        run_dir = args.output_dir / "runs" / point.name
        cmd = command(args, point, run_dir)
        done = finished(run_dir, cmd)
        if done is not None:  # judged again, under this invocation's spike rules
            results[point.name] = collect(args, point, run_dir, cmd, done["exit_status"], done["wall_s"])
        else:
            pending.append((point, run_dir, cmd))
    print(f"{len(points)} runs in the grid: {len(results)} already finished, {len(pending)} to run, "
          f"{args.jobs} at a time; logs in {args.output_dir / 'runs'}", flush=True)

    failed = []
    running = []
    bar = tqdm(total=len(pending), unit="run", dynamic_ncols=True)
    while pending or running:
        while pending and len(running) < args.jobs:
            point, run_dir, cmd = pending.pop(0)
            running.append((point, run_dir, cmd, *start(args, point, run_dir, cmd)))
        time.sleep(0.5)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            point, run_dir, cmd, proc, log, t0 = job
            log.close()
            if proc.returncode == 2:  # a bad flag: every run would fail the same way
                for other in running:
                    other[3].kill()
                tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                print(f"stability_sweep.py: error: {point.name} was refused (exit status 2):\n  " + "\n  ".join(tail),
                      file=sys.stderr)
                shutil.rmtree(run_dir)
                return 2
            result = collect(args, point, run_dir, cmd, proc.returncode, time.perf_counter() - t0)
            results[point.name] = result
            if result["status"].startswith("failed"):
                failed.append(point.name)
            write_summary(args.output_dir, [results[p.name] for p in points if p.name in results])
            bar.update()
            bar.write(f"{point.name}: {result['status']}, diverged={result['diverged']}, loss spikes "
                      f"{result['loss_spikes']}, max grad norm {_fmt(result['max_grad_norm'], '.3g')} "
                      f"({result['max_grad_norm_source']}), final valid ppl {_fmt(result['final_valid_ppl'], '.1f')}, "
                      f"{result['wall_s']:.0f} s")
    bar.close()
    ordered = [results[p.name] for p in points]
    write_summary(args.output_dir, ordered)
    print_table(ordered)
    print(f"\nwrote {args.output_dir / 'summary.json'} and {args.output_dir / 'summary.csv'}")
    if failed:
        print(f"stability_sweep.py: {len(failed)} run(s) failed, see their train.log: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
