"""Learning-rate sensitivity of a method over a grid, with its spread over seeds, and which
differences between methods exceed that spread.

    rows = summarise(results)          # results: the sweep's result.json objects
    pairs = compare(rows)

Learning-rate sensitivity is Wortsman et al. 2023's ("Small-scale proxies for large-scale
Transformer training instabilities", section 2): over a learning-rate grid G,

    sensitivity = mean over lr in G of min(L(lr), L0)  -  min over lr in G of L(lr)

with L(lr) the final validation loss and L0 the loss at initialisation (here the run's first
training loss, before any update: the same for every learning rate of a seed). A run without a
finite final validation loss (diverged, stopped) counts as L0: min(inf, L0). Small is good: a
method whose final loss hardly depends on the learning rate.

Spread over seeds: every figure is computed per seed (a seed's runs over the whole grid) and then
reported as the mean, the sample standard deviation (n - 1) and the min-max range over seeds; a
seed missing any learning rate of the grid is left out of the sensitivity (and counted).

The rule for "exceeds the seed spread": two methods' min-max ranges over seeds do not overlap.
With 3 seeds that is strict (every seed of one is better than every seed of the other); `z`, the
difference of means over the combined standard deviation sqrt(std_a^2 + std_b^2), is reported
beside it.
"""
from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict

RULE = ("a difference exceeds the seed spread when the two methods' min-max ranges over seeds do not overlap; "
        "z = difference of means / sqrt(std_a^2 + std_b^2)")


def sensitivity(final_by_lr: dict[float, float | None], initial: float) -> float:
    """Wortsman et al.'s figure for one seed; None / non-finite final losses count as `initial`."""
    capped = [min(loss, initial) if loss is not None and math.isfinite(loss) else initial
              for loss in final_by_lr.values()]
    return sum(capped) / len(capped) - min(capped)


def spread(values: list[float]) -> dict:
    """mean, std (n - 1; 0 for one value), min, max and n of a list (None when empty)."""
    if not values:
        return dict(mean=None, std=None, min=None, max=None, n=0)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values))


def _final(result: dict) -> float | None:
    loss = result.get("final_valid_loss")
    return loss if loss is not None and math.isfinite(loss) else None


def summarise(results: list[dict], order: list[str] = ()) -> list[dict]:
    """One row per (architecture, method), methods in `order` (then the others by name): the
    sensitivity, the best loss on the grid, the final loss per learning rate (each as `spread`),
    spikes and divergences counted over all its runs."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r.get("architecture", "gpt2"), r["method"])].append(r)
    lrs = sorted({r["lr"] for r in results})
    rows = []
    def key(item):
        (arch, method), _ = item
        return arch, order.index(method) if method in order else len(order), method

    for (arch, method), runs in sorted(groups.items(), key=key):
        by_seed: dict[int, dict[float, dict]] = defaultdict(dict)
        for r in runs:
            by_seed[r["seed"]][r["lr"]] = r
        sens, best, incomplete = [], [], []
        for seed, per_lr in sorted(by_seed.items()):
            if set(per_lr) != set(lrs) or any(r.get("first_loss") is None for r in per_lr.values()):
                incomplete.append(seed)
                continue
            initial = statistics.fmean(r["first_loss"] for r in per_lr.values())
            finals = {lr: _final(r) for lr, r in per_lr.items()}
            sens.append(sensitivity(finals, initial))
            best.append(min(min(v, initial) if v is not None else initial for v in finals.values()))
        per_lr_rows = []
        for lr in lrs:
            at = [by_seed[s][lr] for s in sorted(by_seed) if lr in by_seed[s]]
            finite = [v for v in map(_final, at) if v is not None]
            per_lr_rows.append(dict(lr=lr, final_valid_loss=spread(finite), runs=len(at),
                                    no_final_loss=len(at) - len(finite),
                                    diverged=sum(bool(r.get("diverged")) for r in at),
                                    loss_spikes=sum(r.get("loss_spikes") or 0 for r in at)))
        rows.append(dict(architecture=arch, method=method, seeds=sorted(by_seed), incomplete_seeds=incomplete,
                         lr_sensitivity=spread(sens), best_loss=spread(best), per_lr=per_lr_rows,
                         initial_loss=spread([r["first_loss"] for r in runs if r.get("first_loss") is not None]),
                         runs=len(runs), diverged=sum(bool(r.get("diverged")) for r in runs),
                         loss_spikes=sum(r.get("loss_spikes") or 0 for r in runs),
                         grad_norm_spikes=sum(r.get("grad_norm_spikes") or 0 for r in runs)))
    return rows


def _differ(a: dict, b: dict) -> dict | None:
    if a["n"] < 2 or b["n"] < 2:  # one seed has no spread to exceed
        return None
    diff = a["mean"] - b["mean"]
    combined = math.sqrt(a["std"] ** 2 + b["std"] ** 2)
    return dict(difference=diff, z=diff / combined if combined else (math.inf if diff else 0.0),
                exceeds_seed_spread=a["max"] < b["min"] or b["max"] < a["min"])


def compare(rows: list[dict]) -> list[dict]:
    """Every pair of methods within an architecture, on the sensitivity and on the best loss:
    difference of means (first minus second), z, and whether it exceeds the seed spread."""
    out = []
    by_arch = defaultdict(list)
    for row in rows:
        by_arch[row["architecture"]].append(row)
    for arch, members in sorted(by_arch.items()):
        for a, b in itertools.combinations(members, 2):
            for figure in ("lr_sensitivity", "best_loss"):
                if (d := _differ(a[figure], b[figure])) is not None:
                    out.append(dict(architecture=arch, figure=figure, first=a["method"], second=b["method"], **d))
    return out
