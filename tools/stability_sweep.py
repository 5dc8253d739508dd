"""The stability study: which method against loss spikes keeps training good over which learning
rates, through the real trainer, with the spread over seeds.

Runs the product of the grid axes (--method x --architecture x --lr x --seed, and as options
--sigma x --num-layers x --lr-warmup-iters x --adam-beta2 x --clip-grad) as short pre-training
runs of `pretrain_gpt.py` itself, one process each (the same engine, flags and logs users get),
--jobs at a time, with a progress bar and ETA over the grid. A method is a named set of flags
(METHODS): the paper's embedding fixes, QK-norm, z-loss, Megatron-LM's embedding init.
Resumable: a run whose result.json holds the same command is not run again (one with a changed
command is rerun; a finished one is judged again under the current spike rules). Each run keeps
DIR/runs/NAME/{command.txt, train.log, tensorboard/, result.json}; the sweep writes
DIR/summary.json (a list, one object per run) and DIR/summary.csv after every run, and at the end
the report: DIR/report.md, DIR/report.json and DIR/final_loss_vs_lr.png (learning-rate
sensitivity per architecture x method with its spread over seeds, final loss per learning rate,
which differences exceed the seed spread: megatron_snm/analysis/lr_sensitivity.py), beside the
unigram level of the data (megatron_snm/analysis/unigram.py). `--report-only` writes the report
again from DIR's finished runs without running anything.

    python tools/stability_sweep.py --data-path data/c4_text_document \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model sp.model --output-dir study --jobs 2
    python tools/stability_sweep.py ... --method vanilla embed-ln --lr 1e-3 1e-2 --seed 1
    python tools/stability_sweep.py ... --quick    # a 4-run grid of tiny models, ~1 minute

The default study (DEFAULTS) is the recipe of examples/paper_recipe.sh at a size this 2-core
machine runs 126 times in well under 90 minutes with --jobs 2: Adam with beta2 0.95, weight decay
0.1, clipping at 1.0, a linear warm-up over the first 10% of the steps, cosine decay to lr/10;
sigma = 0.0132 (the paper's 1.7B; --init-method normal, W_O and W_2 scaled by 1/sqrt(2N)), so that
the embedding is as small against the first LayerNorm as at scale; the monitor every few steps.

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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from megatron_snm.analysis.run_history import RunHistory, SpikeRules, stability_verdict
from megatron_snm.model.presets import ARCHITECTURES, architecture_flags

PRETRAIN = Path(__file__).resolve().parents[1] / "pretrain_gpt.py"

# Each method: its --embedding-norm and the further flags that make it. The levers are applied to
# the vanilla model (no embedding fix) so that each is compared with the paper's fix on its own;
# embed-ln+qk-norm is the combination.
METHODS = {
    "vanilla": ("none", []),
    "embed-ln": ("layernorm", []),
    "scaled-embed": ("scaled", []),
    "embed-detach": ("detach", []),
    "emb-std-1": ("none", ["--embedding-init-method-std", "1.0"]),
    "qk-norm": ("none", ["--qk-layernorm"]),
    "z-loss": ("none", ["--z-loss-weight", "1e-4"]),
    "embed-ln+qk-norm": ("layernorm", ["--qk-layernorm"]),
}

# The default study: 7 methods x 2 architectures x 3 learning rates x 3 seeds = 126 runs of a d=64,
# 4-layer model (4 heads of 16; Llama: 2 key/value heads), 300 steps of 12 x 128 tokens (460 K
# tokens), validated at the end on 16 batches. The rates span 1.5 decades, from near the best rate
# to where vanilla ends at the unigram level in calibration (6.95 nats on the C4 sample, sp4k).
# What it costs on the 2-core machine with --jobs 2, and what it shows: docs/stability.md.
DEFAULTS = dict(method=[m for m in METHODS if m != "embed-detach"], architecture=["gpt2", "llama"],
                lr=[1e-2, 1e-1, 3.16e-1], seed=[1, 2, 3], sigma=["0.0132"], num_layers=[4],
                lr_warmup_iters=None, adam_beta2=[0.95], clip_grad=[1.0],
                hidden_size=64, head_dim=16, seq_length=128, batch_size=12, train_iters=300, eval_interval=300,
                eval_iters=16, log_interval=10, log_stability_interval=5, weight_decay=0.1, min_lr_ratio=0.1,
                split="980,20,0")
# --quick: 4 runs of a 2-layer d=32 model, a sane learning rate and a deliberately unstable one.
QUICK = dict(method=["vanilla", "embed-ln"], architecture=["gpt2"], lr=[3e-3, 1.0], seed=[1], clip_grad=[0.0],
             sigma=["small"], num_layers=[2], hidden_size=32, seq_length=32, batch_size=4, train_iters=30,
             eval_interval=10, eval_iters=2, log_interval=5, log_stability_interval=5, lr_warmup_iters=[0],
             adam_beta2=[0.999], weight_decay=0.0, split="80,20,0")

SUMMARY_FIELDS = ["name", "architecture", "method", "embedding_norm", "lr", "seed", "sigma", "num_layers",
                  "lr_warmup_iters", "adam_beta2", "clip_grad", "status", "diverged", "diverged_reason", "loss_spikes",
                  "grad_norm_spikes", "max_grad_norm", "max_grad_norm_step", "max_captured_grad_norm",
                  "max_captured_grad_norm_step", "max_grad_norm_source", "max_captured_embedding_grad_share",
                  "max_captured_final_norm_grad_share", "mean_embedding_grad_share", "first_loss", "final_train_loss",
                  "best_valid_loss", "best_valid_ppl", "final_valid_loss", "final_valid_ppl", "tokens_per_s", "wall_s",
                  "cpu_s"]


@dataclass(frozen=True)
class Point:
    method: str
    architecture: str
    lr: float
    seed: int
    sigma: str
    num_layers: int
    lr_warmup_iters: int
    adam_beta2: float
    clip_grad: float

    @property
    def embedding_norm(self) -> str:
        return METHODS[self.method][0]

    @property
    def setting(self) -> str:
        """The axes other than method, architecture, learning rate and seed: the report compares
        methods within one setting."""
        return (f"sigma{self.sigma}_L{self.num_layers}_wu{self.lr_warmup_iters}_b2{self.adam_beta2:g}"
                f"_clip{self.clip_grad:g}")

    @property
    def name(self) -> str:
        return f"{self.architecture}_{self.method}_lr{self.lr:g}_seed{self.seed}_{self.setting}"


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
    heads = max(1, args.hidden_size // args.head_dim)
    embedding_norm, method_flags = METHODS[point.method]
    return [
        sys.executable, str(PRETRAIN),
        "--num-layers", str(point.num_layers), "--hidden-size", str(args.hidden_size),
        "--num-attention-heads", str(heads), "--seq-length", str(args.seq_length),
        *init, "--embedding-norm", embedding_norm, *method_flags, "--seed", str(point.seed),
        "--micro-batch-size", str(args.batch_size), "--global-batch-size", str(args.batch_size),
        "--train-iters", str(args.train_iters), "--lr", f"{point.lr:g}",
        "--min-lr", f"{point.lr * args.min_lr_ratio:g}", "--lr-warmup-iters", str(point.lr_warmup_iters),
        "--lr-decay-style", "cosine", "--adam-beta2", f"{point.adam_beta2:g}", "--clip-grad", f"{point.clip_grad:g}",
        "--weight-decay", f"{args.weight_decay:g}",
        "--data-path", *args.data_path, "--split", args.split, "--data-cache-path", str(args.output_dir / "index-cache"),
        *tokenizer, *architecture_flags(point.architecture, heads),
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


class Job:
    """One pretrain_gpt.py process; its CPU time comes from wait4 (the sweep's machine is shared,
    so wall time alone says little about what a run costs)."""

    def __init__(self, args, point: Point, run_dir: Path, cmd: list[str]):
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or outdated run starts again from scratch
        run_dir.mkdir(parents=True)
        write_atomic(run_dir / "command.txt", shlex.join(cmd) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process each, whatever launched the sweep
            env.pop(var, None)
        self.point, self.run_dir, self.cmd = point, run_dir, cmd
        with open(run_dir / "train.log", "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.t0 = time.perf_counter()
        self.returncode = self.cpu_s = self.wall_s = None

    def poll(self) -> bool:
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.wall_s, self.cpu_s = time.perf_counter() - self.t0, usage.ru_utime + usage.ru_stime
        return True

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def collect(args, point: Point, run_dir: Path, cmd: list[str], status: int, wall: float, cpu: float | None) -> dict:
    history = RunHistory.read(str(run_dir / "train.log"), str(run_dir / "tensorboard"))
    result = dict(name=point.name, **point.__dict__, embedding_norm=point.embedding_norm, setting=point.setting,
                  status={0: "done", 3: "stopped"}.get(status, f"failed ({status})"), exit_status=status,
                  **stability_verdict(history, args.rules, status), wall_s=round(wall, 1),
                  cpu_s=None if cpu is None else round(cpu, 1), command=shlex.join(cmd))
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
          f" {'emb share':>9s} {'final loss':>10s} {'tok/s':>7s} {'cpu s':>6s}")
    for r in results:
        print(f"{r['name'][:58]:58s} {str(r['diverged']):>8s} {r['loss_spikes']:6d} {r['grad_norm_spikes']:6d}"
              f" {_fmt(r['max_grad_norm'], '8.3g')} {r['max_grad_norm_source'] or '-':>9s}"
              f" {_fmt(r['mean_embedding_grad_share'], '9.2f')} {_fmt(r['final_valid_loss'], '10.3f')}"
              f" {_fmt(r['tokens_per_s'], '7.0f')} {_fmt(r.get('cpu_s'), '6.0f')}")


def unigram_level(args) -> dict | None:
    """The data's unigram loss under --split (cached in DIR/unigram.json); None for a blend."""
    if len(args.data_path) != 1:
        return None
    key = dict(data_path=str(Path(args.data_path[0]).resolve()), split=args.split)
    cache = args.output_dir / "unigram.json"
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached
    except (OSError, ValueError):
        pass
    from megatron_snm.analysis.unigram import unigram_loss

    level = dict(key, **unigram_loss(args.data_path[0], args.split))
    write_atomic(cache, json.dumps(level, indent=1) + "\n")
    return level


def _spread_text(s: dict, spec: str = ".3f") -> str:
    if not s["n"]:
        return "-"
    if s["n"] == 1:
        return format(s["mean"], spec)
    return f"{s['mean']:{spec}} ± {s['std']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"


def report_markdown(report: dict) -> str:
    level = report["unigram"]
    lines = [f"# Stability study: {report['output_dir']}", "",
             f"{report['runs']} runs. Final loss: validation loss (nats/token) at the last step. "
             + (f"Unigram level of the data: {level['loss']:.3f} nats (ppl {level['ppl']:.0f}): the validation "
                f"tokens' cross entropy under the training tokens' frequencies." if level else
                "Unigram level: not computed (a blend of datasets)."), "",
             "LR sensitivity (Wortsman et al. 2023): mean over the learning-rate grid of min(final loss, initial "
             "loss) minus the best final loss on the grid; a run without a finite final loss counts as the initial "
             "loss. Every figure is computed per seed, then given as mean ± std (n - 1) [min, max] over seeds.", ""]
    for setting in report["settings"]:
        rows = [r for r in report["methods"] if r["setting"] == setting]
        lrs = [p["lr"] for p in rows[0]["per_lr"]]
        lines += [f"## {setting}", "",
                  "| architecture | method | LR sensitivity | best final loss | initial loss | diverged / runs "
                  "| loss spikes |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['architecture']} | {r['method']} | {_spread_text(r['lr_sensitivity'])} | "
                         f"{_spread_text(r['best_loss'])} | {_fmt(r['initial_loss']['mean'], '.2f')} | "
                         f"{r['diverged']} / {r['runs']} | {r['loss_spikes']} |")
        lines += ["", "Final validation loss per learning rate (mean ± std over seeds; `n/a k` = k runs without "
                  "a finite final loss):", "",
                  "| architecture | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
                  "|---|---|" + "---|" * len(lrs)]
        for r in rows:
            cells = []
            for p in r["per_lr"]:
                s = p["final_valid_loss"]
                text = "-" if not s["n"] else f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["n"] > 1 else "")
                cells.append(text + (f" (n/a {p['no_final_loss']})" if p["no_final_loss"] else ""))
            lines.append(f"| {r['architecture']} | {r['method']} | " + " | ".join(cells) + " |")
        pairs = [c for c in report["comparisons"] if c["setting"] == setting]
        beyond = [c for c in pairs if c["exceeds_seed_spread"]]
        lines += ["", f"Differences between methods (rule: {report['rule']}): {len(beyond)} of {len(pairs)} "
                  "pairs exceed the seed spread.", ""]
        if beyond:
            lines += ["| architecture | figure | first | second | difference of means | z |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {c['architecture']} | {c['figure']} | {c['first']} | {c['second']} | {c['difference']:+.3f} "
                      f"| {c['z']:+.1f} |" for c in beyond]
        lines.append("")
    return "\n".join(lines)


def write_report(args, results: list[dict]) -> list[Path]:
    from megatron_snm.analysis.lr_sensitivity import RULE, compare, summarise
    from plot_stability import final_loss_vs_lr  # tools/ is this script's directory

    settings = sorted({r["setting"] for r in results})
    methods, comparisons = [], []
    for setting in settings:
        rows = summarise([r for r in results if r["setting"] == setting], order=list(METHODS))
        methods += [dict(setting=setting, **row) for row in rows]
        comparisons += [dict(setting=setting, **c) for c in compare(rows)]
    report = dict(output_dir=str(args.output_dir), runs=len(results), unigram=unigram_level(args), rule=RULE,
                  settings=settings, methods=methods, comparisons=comparisons)
    written = [args.output_dir / "report.json", args.output_dir / "report.md"]
    write_atomic(written[0], json.dumps(report, indent=1) + "\n")
    write_atomic(written[1], report_markdown(report))
    for setting in settings:
        name = "final_loss_vs_lr.png" if len(settings) == 1 else f"final_loss_vs_lr_{setting}.png"
        written.append(final_loss_vs_lr([r for r in methods if r["setting"] == setting], report["unigram"],
                                        args.output_dir / name, title=setting))
    return written


def _with_study_axes(result: dict) -> dict:
    """A result.json of the sweep before methods (embedding modes only) in the study's terms."""
    if "setting" in result:
        return result
    method = {norm: name for name, (norm, flags) in METHODS.items() if not flags}[result["embedding_norm"]]
    point = Point(method, result.get("architecture", "gpt2"), *(result[k] for k in (
        "lr", "seed", "sigma", "num_layers", "lr_warmup_iters", "adam_beta2", "clip_grad")))
    return dict(result, method=method, architecture=point.architecture, setting=point.setting)


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
    p.add_argument("--report-only", action="store_true",
                   help="write DIR's report again from its finished runs (DIR/runs/*/result.json), run nothing")
    grid = p.add_argument_group("grid axes (the sweep runs their product)")
    grid.add_argument("--method", nargs="+", choices=list(METHODS),
                      help="; ".join(f"{m}: --embedding-norm {n} {' '.join(f)}".strip()
                                     for m, (n, f) in METHODS.items()))
    grid.add_argument("--architecture", nargs="+", choices=ARCHITECTURES,
                      help="gpt2 and/or llama (rotary, RMSNorm, SwiGLU, query groups, no biases)")
    grid.add_argument("--lr", nargs="+", type=float, help="peak learning rates")
    grid.add_argument("--seed", nargs="+", type=int)
    grid.add_argument("--sigma", nargs="+", help="'small' (--init-method small) or fixed stds, e.g. 0.0132")
    grid.add_argument("--num-layers", nargs="+", type=int)
    grid.add_argument("--lr-warmup-iters", nargs="+", type=int, help="default: 10%% of --train-iters")
    grid.add_argument("--adam-beta2", nargs="+", type=float)
    grid.add_argument("--clip-grad", nargs="+", type=float, help="0: no clipping")
    fixed = p.add_argument_group("the same for every run")
    fixed.add_argument("--hidden-size", type=int)
    fixed.add_argument("--head-dim", type=int, help="--hidden-size / this many heads (Llama: a key/value head per two)")
    fixed.add_argument("--seq-length", type=int)
    fixed.add_argument("--batch-size", type=int, help="global = micro batch (one process, no accumulation)")
    fixed.add_argument("--train-iters", type=int)
    fixed.add_argument("--eval-interval", type=int, help="should divide --train-iters (the final validation)")
    fixed.add_argument("--eval-iters", type=int)
    fixed.add_argument("--log-interval", type=int)
    fixed.add_argument("--log-stability-interval", type=int, help="the monitor's interval (gradient attribution)")
    fixed.add_argument("--weight-decay", type=float)
    fixed.add_argument("--min-lr-ratio", type=float, help="the cosine decay ends at this fraction of the peak lr")
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
    for key in ("hidden_size", "head_dim", "seq_length", "batch_size", "train_iters", "eval_interval", "log_interval",
                "jobs", "threads", "spike_window"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = [args.train_iters // 10]
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


def report(args, results: list[dict]) -> None:
    for path in write_report(args, results):
        print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # runs the cleanup below
    if args.report_only:
        paths = sorted((args.output_dir / "runs").glob("*/result.json"))
        if not paths:
            print(f"stability_sweep.py: error: {args.output_dir / 'runs'} holds no finished run (result.json)",
                  file=sys.stderr)
            return 2
        report(args, [_with_study_axes(json.loads(path.read_text())) for path in paths])
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    points = [Point(*values) for values in itertools.product(
        args.method, args.architecture, args.lr, args.seed, args.sigma, args.num_layers, args.lr_warmup_iters,
        args.adam_beta2, args.clip_grad)]
    # Run seed by seed: a study stopped early (and resumed later) has every configuration's first seeds.
    points.sort(key=lambda point: args.seed.index(point.seed))
    results: dict[str, dict] = {}
    pending = []
    for point in points:
        run_dir = args.output_dir / "runs" / point.name
        cmd = command(args, point, run_dir)
        done = finished(run_dir, cmd)
        if done is not None:  # judged again, under this invocation's spike rules
            results[point.name] = collect(args, point, run_dir, cmd, done["exit_status"], done["wall_s"],
                                          done.get("cpu_s"))
        else:
            pending.append((point, run_dir, cmd))
    print(f"{len(points)} runs in the grid: {len(results)} already finished, {len(pending)} to run, "
          f"{args.jobs} at a time; logs in {args.output_dir / 'runs'}", flush=True)

    failed = []
    running: list[Job] = []
    bar = tqdm(total=len(pending), unit="run", dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                running.append(Job(args, *pending.pop(0)))
            time.sleep(0.2)
            for job in [j for j in running if j.poll()]:
                running.remove(job)
                point, run_dir = job.point, job.run_dir
                if job.returncode == 2:  # a bad flag: every run would fail the same way
                    tail = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()[-3:]
                    print(f"stability_sweep.py: error: {point.name} was refused (exit status 2):\n  "
                          + "\n  ".join(tail), file=sys.stderr)
                    shutil.rmtree(run_dir)
                    return 2
                result = collect(args, point, run_dir, job.cmd, job.returncode, job.wall_s, job.cpu_s)
                results[point.name] = result
                if result["status"].startswith("failed"):
                    failed.append(point.name)
                write_summary(args.output_dir, [results[p.name] for p in points if p.name in results])
                bar.update()
                bar.write(f"{point.name}: {result['status']}, diverged={result['diverged']}, loss spikes "
                          f"{result['loss_spikes']}, max grad norm {_fmt(result['max_grad_norm'], '.3g')} "
                          f"({result['max_grad_norm_source']}), final valid loss "
                          f"{_fmt(result['final_valid_loss'], '.3f')}, "
                          f"{result['wall_s']:.0f} s ({result['cpu_s']:.0f} s CPU)")
    finally:  # interrupted (Ctrl-C, SIGTERM from a time limit) or refused: no run outlives the sweep
        for job in running:
            job.kill()
    bar.close()
    ordered = [results[p.name] for p in points]
    write_summary(args.output_dir, ordered)
    print_table(ordered)
    print(f"\nwrote {args.output_dir / 'summary.json'} and {args.output_dir / 'summary.csv'}")
    report(args, ordered)
    if failed:
        print(f"stability_sweep.py: {len(failed)} run(s) failed, see their train.log: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
