"""Plots of stability runs: loss and gradient-norm curves, validation perplexity against learning
rate per method (the paper's main picture), and the stability monitor's per-layer figures over
training. Spikes are marked (the rules of megatron_snm/analysis/run_history.py).

    python tools/plot_stability.py sweeps/lr sweeps/noclip --output-dir docs/stability

Each DIR is a sweep's output directory (its runs/*/), or one run directory holding train.log (and
tensorboard/). A run's axes come from its result.json (written by tools/stability_sweep.py), else
from the flags in its command.txt. Runs are grouped by the axes other than the method (the
sweep's, else the embedding mode), learning rate and seed (architecture, sigma, depth, warm-up,
beta2, clipping); each group gets
GROUP-loss.png (a panel per learning rate, a line per method and seed), GROUP-grad_norm.png,
GROUP-valid_ppl_vs_lr.png and GROUP-monitor_lrX.png (residual-stream std per layer, shallow
LayerNorm amplification, gradient norm of embedding / blocks / final LayerNorm, over training).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_snm.analysis.run_history import RunHistory, SpikeRules, run_directories, spikes  # noqa: E402

# By the sweep's method names (tools/stability_sweep.py METHODS) and, for runs it did not write, by
# --embedding-norm.
METHOD_COLOURS = {"vanilla": "tab:red", "none": "tab:red", "embed-ln": "tab:blue", "layernorm": "tab:blue",
                  "scaled-embed": "tab:green", "scaled": "tab:green", "embed-detach": "tab:orange",
                  "detach": "tab:orange", "emb-std-1": "tab:purple", "qk-norm": "tab:brown", "z-loss": "tab:pink",
                  "embed-ln+qk-norm": "tab:cyan"}
GROUP_AXES = ("architecture", "sigma", "num_layers", "lr_warmup_iters", "adam_beta2", "clip_grad")
DPI = 80


@dataclass
class Run:
    name: str
    axes: dict
    history: RunHistory
    diverged: bool | None

    @property
    def group(self) -> str:
        a = self.axes
        return (("" if a.get("architecture", "gpt2") == "gpt2" else a["architecture"] + "_")
                + f"sigma{a.get('sigma', '?')}_L{a.get('num_layers', '?')}_wu{a.get('lr_warmup_iters', '?')}"
                f"_b2{a.get('adam_beta2', '?'):g}_clip{a.get('clip_grad', '?'):g}")


def _axes_from_command(text: str) -> dict:
    """The grid axes named by pretrain_gpt.py's flags (for runs the sweep did not write)."""
    argv = shlex.split(text)
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    sigma = "small" if flags.get("--init-method") == "small" else flags.get("--init-method-std", "0.02")
    norm = flags.get("--embedding-norm", "layernorm")
    return dict(embedding_norm=norm, method=norm, architecture="llama" if "--swiglu" in argv else "gpt2",
                lr=float(flags.get("--lr", "1e-4")),
                seed=int(flags.get("--seed", "1234")), sigma=sigma, num_layers=int(flags.get("--num-layers", "0")),
                lr_warmup_iters=int(flags.get("--lr-warmup-iters", "0")),
                adam_beta2=float(flags.get("--adam-beta2", "0.999")), clip_grad=float(flags.get("--clip-grad", "0")))


def read_run(run_dir: Path) -> Run:
    result_path, command_path = run_dir / "result.json", run_dir / "command.txt"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None:
        axes = {k: result.get(k) for k in ("embedding_norm", "lr", "seed", *GROUP_AXES)}
        axes["method"] = result.get("method", result["embedding_norm"])
        axes["architecture"] = result.get("architecture", "gpt2")
    elif command_path.exists():
        axes = _axes_from_command(command_path.read_text())
    else:
        raise ValueError(f"{run_dir}: neither result.json nor command.txt says what the run was")
    history = RunHistory.read(str(run_dir / "train.log"), str(run_dir / "tensorboard"))
    return Run(run_dir.name, axes, history, result["diverged"] if result else None)


def find_runs(directories: list[str]) -> list[Run]:
    return [read_run(Path(d)) for d in run_directories(directories)]


def _label(run: Run, seeds: bool) -> str:
    return run.axes["method"] + (f" seed {run.axes['seed']}" if seeds else "")


def _save(fig, path: Path, dpi: int = DPI) -> Path:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def curves(runs: list[Run], series: str, rules: SpikeRules, path: Path) -> Path:
    """A panel per learning rate, a line per method (and seed); spikes marked with x."""
    lrs = sorted({r.axes["lr"] for r in runs})
    seeds = len({r.axes["seed"] for r in runs}) > 1
    fig, axes = plt.subplots(1, len(lrs), figsize=(max(6.0, 3.6 * len(lrs)), 3.2), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        for run in sorted((r for r in runs if r.axes["lr"] == lr), key=lambda r: (r.axes["method"], r.axes["seed"])):
            values = run.history.loss if series == "loss" else run.history.grad_norm
            colour = METHOD_COLOURS.get(run.axes["method"], "black")
            steps = list(values)
            ax.plot(steps, [values[s] for s in steps], color=colour, linewidth=0.9, alpha=0.85,
                    linestyle="-" if run.axes["seed"] == min(r.axes["seed"] for r in runs) else ":",
                    label=_label(run, seeds))
            factor = rules.loss_factor if series == "loss" else rules.grad_factor
            marked = spikes(values, factor, rules.window, rules.min_history)
            ax.scatter(marked, [values[s] for s in marked], color=colour, marker="x", s=30, zorder=3)
            for step in run.history.nonfinite_steps:
                ax.axvline(step, color=colour, alpha=0.3, linewidth=0.8)
        ax.set(title=f"lr {lr:g}", xlabel="step")
        ax.grid(alpha=0.3)
        if series == "grad_norm":
            ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss" if series == "loss" else "global gradient norm (before clipping)")
    axes[0][0].legend(fontsize=7)
    what = "loss" if series == "loss" else "gradient norm"
    fig.suptitle(f"{runs[0].group}: {what} (x: spike, vertical line: non-finite step)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def valid_ppl_vs_lr(runs: list[Run], path: Path) -> Path:
    """Final validation perplexity against learning rate, a line per method (mean over seeds, each
    seed a dot); a diverged run is an X, at the top when it has no finite final validation."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    finite = [min(20.0, r.history.valid_loss.get(r.history.train_iters, math.inf)) for r in runs]
    top = math.exp(max([v for v in finite if math.isfinite(v)] or [1.0])) * 1.5
    by_method = defaultdict(lambda: defaultdict(list))
    for run in runs:
        loss = run.history.valid_loss.get(run.history.train_iters) if run.history.train_iters else None
        ppl = math.exp(loss) if loss is not None and math.isfinite(loss) and loss < 20 else None
        by_method[run.axes["method"]][run.axes["lr"]].append((ppl, run.diverged))
    for method, per_lr in sorted(by_method.items()):
        colour = METHOD_COLOURS.get(method, "black")
        lrs = sorted(per_lr)
        means = []
        for lr in lrs:
            ppls = [p for p, _ in per_lr[lr] if p is not None]
            means.append(sum(ppls) / len(ppls) if ppls else math.nan)
            ax.scatter([lr] * len(ppls), ppls, color=colour, s=12, alpha=0.6)
            for ppl, diverged in per_lr[lr]:
                if ppl is None or diverged:
                    ax.scatter([lr], [ppl or top], color=colour, marker="X", s=60)
        ax.plot(lrs, means, color=colour, marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="final validation perplexity",
           title=f"{runs[0].group}\n(X: diverged; at the top: no finite final validation)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def monitor(runs: list[Run], lr: float, path: Path) -> Path | None:
    """Rows: methods at this learning rate (first seed); columns: residual-stream std per layer,
    LN_1 amplification per layer (Embed LN's as layer 0), gradient norm per module, over training."""
    chosen = {}
    for run in sorted((r for r in runs if r.axes["lr"] == lr and r.history.stability), key=lambda r: r.axes["seed"]):
        chosen.setdefault(run.axes["method"], run)
    if not chosen:
        return None
    fig, axes = plt.subplots(len(chosen), 3, figsize=(12, 2.5 * len(chosen)), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (method, run) in zip(axes, sorted(chosen.items())):
        steps = list(run.history.stability)
        names = sorted({k for f in run.history.stability.values() for k in f})
        layers = sorted({k.split("/")[1] for k in names if k.startswith("residual_std/layer_")})
        def series(key):
            return [run.history.stability[s].get(key, math.nan) for s in steps]
        for i, layer in enumerate(layers):
            colour = cmap(i / max(1, len(layers) - 1))
            row[0].plot(steps, series(f"residual_std/{layer}"), color=colour, linewidth=0.9)
            row[1].plot(steps, series(f"ln_amplification/{layer}.ln_1"), color=colour, linewidth=0.9)
            row[2].plot(steps, series(f"grad_norm/{layer}"), color=colour, linewidth=0.9)
        row[0].plot(steps, series("residual_std/embedding"), color="black", linewidth=1.4, label="embedding")
        if "ln_amplification/embedding.norm" in names:
            row[1].plot(steps, series("ln_amplification/embedding.norm"), color="black", linewidth=1.4, label="Embed LN")
        row[2].plot(steps, series("grad_norm/embedding"), color="black", linewidth=1.4, label="embedding")
        row[2].plot(steps, series("grad_norm/final_norm"), color="tab:red", linewidth=1.0, label="final LN")
        if run.history.grad_norm:
            row[2].plot(list(run.history.grad_norm), list(run.history.grad_norm.values()), color="grey", alpha=0.35,
                        linewidth=0.6, label="global (every step)")
        row[0].set_ylabel(f"{method}\n(lr {lr:g})")
        for ax, title in zip(row, ("residual-stream std after each block", "LN_1 grad amplification",
                                   "gradient norm")):
            ax.set(yscale="log", title=title)
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("step (colour: block, dark = shallow)")
    fig.suptitle(f"{runs[0].group}: stability monitor over training", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=64)  # 9 panels of many lines: keeps the PNG under ~200 KB


def final_loss_vs_lr(rows: list[dict], unigram: dict | None, path: Path, title: str = "") -> Path:
    """The study's figure: final validation loss against the peak learning rate (log x), a panel
    per architecture, a line per method through the mean over seeds with the min-max range over
    seeds shaded; a loss more than 0.3 above the median initial loss is drawn there, an X marking a
    learning rate with a seed beyond it or without a finite final loss; the y axis spans what is
    drawn and the unigram level. `rows`: lr_sensitivity.summarise()'s."""
    archs = sorted({r["architecture"] for r in rows})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.6 * len(archs), 4.6), sharey=True, squeeze=False)
    # The median over methods: one method's initial loss can be far above the others' (emb-std-1's
    # tied output layer starts with logits of std ~sqrt(d)), and would squash every other curve.
    initials = sorted(r["initial_loss"]["mean"] for r in rows if r["initial_loss"]["n"])
    initial = initials[len(initials) // 2] if initials else None
    finals = [p["final_valid_loss"][k] for r in rows for p in r["per_lr"] if p["final_valid_loss"]["n"]
              for k in ("min", "max")]
    top = (initial + 0.3) if initial is not None else max(finals, default=1.0)  # beyond it: failed
    # The axis spans the losses drawn (and the unigram level), not the empty room up to the top.
    failed = any(p["no_final_loss"] for r in rows for p in r["per_lr"])
    shown = [min(v, top) for v in finals] + ([unigram["loss"]] if unigram else []) + ([top] if failed else [])
    low, high = min(shown, default=0.0), max(shown, default=1.0)
    low, high = low - 0.05 * (high - low) - 0.01, high + 0.05 * (high - low) + 0.01
    for ax, arch in zip(axes[0], archs):
        members = [r for r in rows if r["architecture"] == arch]
        for i, row in enumerate(members):
            colour = METHOD_COLOURS.get(row["method"], plt.get_cmap("tab10")(i % 10))
            points = [(p["lr"], p["final_valid_loss"]) for p in row["per_lr"] if p["final_valid_loss"]["n"]]
            if points:
                lrs = [lr for lr, _ in points]
                ax.plot(lrs, [min(s["mean"], top) for _, s in points], color=colour, marker="o", markersize=3.5,
                        linewidth=1.3, label=row["method"])
                ax.fill_between(lrs, [min(s["min"], top) for _, s in points], [min(s["max"], top) for _, s in points],
                                color=colour, alpha=0.15, linewidth=0)
            off = [p["lr"] for p in row["per_lr"] if p["no_final_loss"] or (p["final_valid_loss"]["n"]
                                                                              and p["final_valid_loss"]["max"] > top)]
            ax.scatter(off, [top] * len(off), color=colour, marker="X", s=50, zorder=3)
        if unigram:
            ax.axhline(unigram["loss"], color="black", linestyle="--", linewidth=0.9,
                       label=f"unigram level {unigram['loss']:.2f}")
        if initial is not None and initial < high:
            ax.axhline(initial, color="grey", linestyle=":", linewidth=0.9,
                       label=f"initial loss {initial:.2f} (median over methods)")
        ax.set(xscale="log", xlabel="peak learning rate", title=arch, ylim=(low, high))
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("final validation loss (nats/token)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{title}\nline: mean over seeds, shaded: min-max over seeds\nX at the top: a seed without a "
                 "finite final loss or above the (median) initial loss + 0.3", fontsize=8)
    fig.tight_layout()
    return _save(fig, path, dpi=96)


def plot_all(runs: list[Run], output_dir: Path, rules: SpikeRules, monitor_lrs: list[float] | None) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for run in runs:
        groups[run.group].append(run)
    written = []
    for group, members in sorted(groups.items()):
        written.append(curves(members, "loss", rules, output_dir / f"{group}-loss.png"))
        written.append(curves(members, "grad_norm", rules, output_dir / f"{group}-grad_norm.png"))
        written.append(valid_ppl_vs_lr(members, output_dir / f"{group}-valid_ppl_vs_lr.png"))
        lrs = sorted({r.axes["lr"] for r in members})
        for lr in (monitor_lrs if monitor_lrs else lrs[-1:]):
            if lr in lrs and (path := monitor(members, lr, output_dir / f"{group}-monitor_lr{lr:g}.png")):
                written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="sweep output directories or run directories")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--monitor-lr", type=float, nargs="+", help="learning rates to draw the monitor's figures for "
                   "(default: each group's largest)")
    p.add_argument("--spike-factor", type=float, default=1.5)
    p.add_argument("--grad-spike-factor", type=float, default=4.0)
    p.add_argument("--spike-window", type=int, default=20)
    args = p.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
    except (ValueError, OSError) as err:
        print(f"plot_stability.py: error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"plot_stability.py: error: no runs found in {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    written = plot_all(runs, args.output_dir, SpikeRules(args.spike_factor, args.grad_spike_factor, args.spike_window),
                       args.monitor_lr)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
