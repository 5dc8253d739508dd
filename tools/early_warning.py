"""Early warning over stability runs: for each monitored signal and threshold rule, how many loss
spikes it announced (and how many steps before), how many it missed, how often it fired without one.

    python tools/early_warning.py sweeps/study [sweeps/other ...] --output-dir docs/stability

Each DIR is a sweep's output directory (every DIR/runs/NAME with a train.log and tensorboard/, as
tools/stability_sweep.py writes them) or one run directory. Prints the table and writes
early_warning.json (the rows, the settings, each run's loss spikes) and early_warning.md to
--output-dir (default: the first DIR). The rules: megatron_snm/analysis/early_warning.py; the
signals: megatron_snm/warning_signals.py (the names --spike-warning takes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_snm.analysis.early_warning import Settings, early_warning, markdown, read_runs, text_table
from megatron_snm.analysis.run_history import SpikeRules
from megatron_snm.atomic import write_atomically
from megatron_snm.warning_signals import SIGNALS


def _absolute(text: str) -> tuple[str, tuple[float, ...]]:
    signal, _, values = text.partition("=")
    if signal not in SIGNALS:
        raise argparse.ArgumentTypeError(f"unknown signal {signal!r} (one of {', '.join(SIGNALS)})")
    try:
        return signal, tuple(float(v) for v in values.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIGNAL=VALUE[,VALUE...]") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="sweep output directories (their runs/*/) or run directories")
    p.add_argument("--output-dir", help="where early_warning.json and .md go (default: the first DIR)")
    p.add_argument("--spike-factor", type=float, default=SpikeRules.loss_factor,
                   help="a loss spike: a loss above this x the mean of the previous --spike-window steps")
    p.add_argument("--spike-window", type=int, default=SpikeRules.window)
    p.add_argument("--factors", type=float, nargs="+", default=list(Settings.factors),
                   help="relative rules: a crossing is a value above FACTOR x the signal's running mean")
    p.add_argument("--window", type=int, default=Settings.window,
                   help="the running mean covers this many previous observations of the signal")
    p.add_argument("--min-history", type=int, default=Settings.min_history,
                   help="observations needed before a relative rule can fire")
    p.add_argument("--horizon", type=int, default=Settings.horizon,
                   help="a crossing warns a spike at most this many steps after it")
    defaults = "; ".join(f"{k}=" + ",".join(f"{v:g}" for v in values) for k, values in Settings().absolute.items())
    p.add_argument("--absolute", type=_absolute, action="append", metavar="SIGNAL=V[,V...]",
                   help=f"absolute thresholds of a signal, replacing its defaults ({defaults})")
    args = p.parse_args(argv)
    for name in ("spike_window", "window", "min_history", "horizon"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.spike_factor <= 1 or any(f <= 1 for f in args.factors):
        p.error("--spike-factor and --factors must be above 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs = read_runs(args.dirs)
    except (ValueError, OSError) as err:
        print(f"early_warning.py: error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"early_warning.py: error: no runs found in {' '.join(args.dirs)}", file=sys.stderr)
        return 2
    settings = Settings(factors=tuple(args.factors), window=args.window, min_history=args.min_history,
                        horizon=args.horizon, absolute={**Settings().absolute, **dict(args.absolute or [])})
    table = early_warning(runs, SpikeRules(args.spike_factor, window=args.spike_window), settings)
    print(text_table(table))
    output_dir = args.output_dir or args.dirs[0]
    os.makedirs(output_dir, exist_ok=True)
    for name, text in (("early_warning.json", json.dumps(table, indent=1) + "\n"), ("early_warning.md", markdown(table))):
        path = os.path.join(output_dir, name)
        write_atomically(path, text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
