"""The paper's two mechanisms at initialisation, measured on our model against their formulas.

For every configuration of the grid (hidden size d x depth N x --embedding-norm x scaled init x
sigma) this builds the real GPTModel (our layers, our init), runs one forward/backward pass on a
batch of tokens and prints, per layer:

1. Residual stream. The std of the hidden states after the embedding and after each block, against
   the additive rule var_n = var_0 + sum over the sub-layers so far of var(sub-layer output)
   (sub-layer outputs at init are nearly uncorrelated with the stream), and against the closed
   form: var_0 = 2 sigma^2 (none, detach: E + P), (d + 1) sigma^2 (scaled), 1 (layernorm), plus per
   block var(FFN) = 4d sigma_2^2 E[GELU(z)^2], z ~ N(0, d sigma^2), and var(attention) =
   d sigma_o^2 * d sigma^2 * H_s / s (near-uniform causal averaging of s independent values; H_s
   the harmonic number). sigma_2 = sigma_o = sigma / sqrt(2N) with scaled init, sigma without: the
   "plain" init whose residual stream grows block after block.
2. LayerNorm gradient amplification ||grad in|| / ||grad out|| of every LayerNorm (Embed LN's own
   included) against 1/std(its input).
3. The gradient norm of the embedding (and of its table alone), of each block, of the final LN.

    python tools/stability_at_init.py --hidden-size 128 256 --num-layers 6 12 \
        --embedding-norm none layernorm scaled --scaled-init on off --sigma small 0.0132 \
        --data-path data/c4_text_document --vocab-size 4096 --output-dir at-init/

Prints each configuration's tables as it goes ([i/n] and the time left on stderr), then a summary
table. Everything measured goes to --output-dir (default runs/stability_at_init): results.json (per
configuration its per-layer figures) and at_init_d{D}_L{N}.png per shape (one line per
configuration). The last line printed is one short JSON object: `max_rel_error_ln_amplification`
(the worst |measured / (1/std(x)) - 1| over every LayerNorm of every configuration), its place,
`max_rel_error_residual_std` (the additive rule's worst), `results` (the path of results.json) and
`plots`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from megatron_snm.atomic import write_atomically
from megatron_snm.data.indexed_dataset import IndexedDataset, IndexedDatasetError, exists
from megatron_snm.model.config import EMBEDDING_NORMS, GPTConfig
from megatron_snm.model.gpt import GPTModel
from megatron_snm.model.init import output_sigma, sigma
from megatron_snm.model.presets import ARCHITECTURES, architecture
from megatron_snm.training.monitor import StabilityMonitor


@dataclass(frozen=True)
class Setting:
    hidden_size: int
    num_layers: int
    embedding_norm: str
    scaled_init: bool
    sigma: str  # "small" (sqrt(2/(5d))) or a fixed std such as "0.0132"
    architecture: str = "gpt2"  # gpt2 | llama (model/presets.py)

    @property
    def label(self) -> str:
        return (f"{'' if self.architecture == 'gpt2' else self.architecture + ', '}{self.embedding_norm}, "
                f"{'scaled' if self.scaled_init else 'plain'} init, sigma={self.sigma}")

    def config(self, seq_length: int, vocab_size: int, seed: int) -> GPTConfig:
        fixed = self.sigma != "small"
        return GPTConfig(num_layers=self.num_layers, hidden_size=self.hidden_size,
                         num_attention_heads=max(1, self.hidden_size // 64), seq_length=seq_length,
                         vocab_size=vocab_size, init_method="normal" if fixed else "small",
                         init_method_std=float(self.sigma) if fixed else 0.02, scaled_init=self.scaled_init,
                         embedding_norm=self.embedding_norm, seed=seed, **architecture(
                             self.architecture, max(1, self.hidden_size // 64)))


def token_batch(data_path: str | None, batch_size: int, seq_length: int, vocab_size: int, seed: int):
    """tokens, labels [b, s]: consecutive tokens of randomly chosen documents of the dataset (uniform
    random ids without --data-path)."""
    rng = np.random.default_rng(seed)
    need = batch_size * (seq_length + 1)
    if data_path is None:
        flat = rng.integers(0, vocab_size, need)
    else:
        dataset = IndexedDataset(data_path)
        pieces, have = [], 0
        for doc in rng.permutation(len(dataset)):
            pieces.append(np.asarray(dataset[int(doc)], dtype=np.int64))
            have += len(pieces[-1])
            if have >= need:
                break
        flat = np.concatenate(pieces)
        if len(flat) < need:
            raise ValueError(f"--data-path {data_path}: {len(flat)} tokens, fewer than "
                             f"--batch-size x (--seq-length + 1) = {need}")
        flat = flat[:need]
        if flat.max() >= vocab_size:
            raise ValueError(f"--data-path {data_path} holds token id {flat.max()} >= --vocab-size {vocab_size}")
    rows = torch.from_numpy(flat.reshape(batch_size, seq_length + 1).astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def gelu_square_mean(variance: float) -> float:
    """E[GELU(z)^2] for z ~ N(0, variance), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    z = torch.tensor(nodes * math.sqrt(variance))
    return float((torch.nn.functional.gelu(z) ** 2).numpy() @ weights / weights.sum())


def silu_square_mean(variance: float) -> float:
    """E[SiLU(z)^2] for z ~ N(0, variance), by Gauss-Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    z = torch.tensor(nodes * math.sqrt(variance))
    return float((torch.nn.functional.silu(z) ** 2).numpy() @ weights / weights.sum())


def closed_form(config: GPTConfig) -> tuple[float, float, float]:
    """(var_0, var(attention output), var(FFN output)) at init, from the init alone. The norm before
    each sub-layer gives its input unit variance, so a first projection's outputs are N(0, d sigma^2).
    Attention: the values (shared by a query group's heads, which changes nothing at init), averaged
    near-uniformly over the causal prefix (rotary positions turn queries and keys, not values), through
    W_O [heads x head_dim -> d]. FFN: W_2 of GELU(z) (GPT-2), or of SiLU(z_gate) * z_up with the two
    independent (SwiGLU: E[SiLU^2] d sigma^2). Without a position table (rotary) the embedding's
    variance is sigma^2 (none, detach) or d sigma^2 (scaled)."""
    d, s, sig, sig_out = config.hidden_size, config.seq_length, sigma(config), output_sigma(config)
    table = 1 if config.position_embedding_type == "learned_absolute" else 0
    var0 = {"none": (1 + table) * sig**2, "detach": (1 + table) * sig**2, "scaled": (d + table) * sig**2,
            "layernorm": 1.0}
    harmonic = sum(1.0 / t for t in range(1, s + 1))
    attention = config.num_attention_heads * config.head_dim * sig_out**2 * d * sig**2 * harmonic / s
    if config.swiglu:
        ffn = config.ffn_hidden_size * sig_out**2 * silu_square_mean(d * sig**2) * d * sig**2
    else:
        ffn = config.ffn_hidden_size * sig_out**2 * gelu_square_mean(d * sig**2)
    return var0[config.embedding_norm], attention, ffn


def per_token_amplification_hooks(model: GPTModel, out: dict[str, tuple[float, float]]) -> list:
    """Hooks that put into out[name], for each norm, (a) its amplification predicted token by
    token, sqrt(sum_t |g_t|^2 / std_t^2) / |g| with std_t = sqrt(var_t + eps) of token t's own
    input (RMSNorm: rms_t = sqrt(mean(x_t^2) + eps)): the exact factor where the tokens' stds differ
    (1/std of the whole tensor averages them); and (b) the share of that kept by the norm's backward,
    which removes from each g_t its component along the normalised input x_hat_t (and LayerNorm's,
    its mean too): ~sqrt(1 - 2/d) (LayerNorm) or sqrt(1 - 1/d) (RMSNorm) for a g unrelated to x."""
    norms = [("embedding.norm", getattr(model.embedding, "norm", None)), ("final_norm", model.final_norm.norm)]
    norms += [(f"layer_{b.layer_number:02d}.{ln}", getattr(b, ln)) for b in model.layers for ln in ("ln_1", "ln_2")]
    inputs_seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, norm in norms:
        if norm is None:
            continue
        rms = model.config.normalization == "RMSNorm"
        def forward(mod, inputs, output, name=name, rms=rms):
            x = inputs[0].detach().double()
            centred = x if rms else x - x.mean(-1, keepdim=True)
            std = (centred.pow(2).mean(-1, keepdim=True) + mod.eps).sqrt()
            inputs_seen[name] = (centred / std, std)
        def backward(mod, grad_input, grad_output, name=name, rms=rms):
            x_hat, std = inputs_seen[name]
            g = grad_output[0].detach().double()
            kept = g - (0 if rms else g.mean(-1, keepdim=True)) - x_hat * (g * x_hat).mean(-1, keepdim=True)
            per_token = (g / std).norm()
            out[name] = (float(per_token / g.norm()), float((kept / std).norm() / per_token))
        handles += [norm.register_forward_hook(forward), norm.register_full_backward_hook(backward)]
    return handles


def measure(setting: Setting, tokens: torch.Tensor, labels: torch.Tensor, vocab_size: int, seed: int) -> dict:
    config = setting.config(tokens.shape[1], vocab_size, seed)
    model = GPTModel(config)
    sublayer_var: dict[int, float] = {}
    per_token: dict[str, tuple[float, float]] = {}
    handles = []
    for block in model.layers:
        for sub in (block.attention, block.mlp):
            def record(mod, inputs, output, n=block.layer_number):
                sublayer_var[n] = sublayer_var.get(n, 0.0) + float(output.detach().double().var())
            handles.append(sub.register_forward_hook(record))
    handles += per_token_amplification_hooks(model, per_token)
    monitor = StabilityMonitor(model)
    with monitor.capture():
        loss = model(tokens, labels).mean()
        loss.backward()
    for handle in handles:
        handle.remove()
    f = monitor.figures()

    var0_form, attention_form, ffn_form = closed_form(config)
    N = setting.num_layers
    measured = [f["residual_std/embedding"]] + [f[f"residual_std/layer_{n:02d}"] for n in range(1, N + 1)]
    additive = [measured[0]] + [math.sqrt(measured[0] ** 2 + sum(sublayer_var[k] for k in range(1, n + 1)))
                                for n in range(1, N + 1)]
    formula = [math.sqrt(var0_form + n * (attention_form + ffn_form)) for n in range(N + 1)]
    norms = (["embedding.norm"] if setting.embedding_norm == "layernorm" else []) + \
        [f"layer_{n:02d}.{ln}" for n in range(1, N + 1) for ln in ("ln_1", "ln_2")] + ["final_norm"]
    # LayerNorm amplifies by ~1/std(x), RMSNorm by ~1/rms(x) (the monitor reports both).
    reference = "ln_input_rms" if config.normalization == "RMSNorm" else "ln_input_std"
    layer_norms = [dict(name=name, input_std=f[f"{reference}/{name}"], predicted=1 / f[f"{reference}/{name}"],
                        per_token=per_token[name][0], projection_kept=per_token[name][1],
                        measured=f[f"ln_amplification/{name}"]) for name in norms]
    for row in layer_norms:
        row["rel_error"] = abs(row["measured"] / row["predicted"] - 1)
    return dict(
        setting=setting.__dict__ | dict(label=setting.label, sigma_value=sigma(config),
                                        output_sigma=output_sigma(config)),
        loss=loss.item(), residual_std=measured, residual_std_additive=additive, residual_std_formula=formula,
        residual_rel_error=[abs(a / m - 1) for a, m in zip(additive, measured)],
        layer_norms=layer_norms,
        grad_norm_embedding=f["grad_norm/embedding"],
        grad_norm_embedding_table=float(model.embedding.word_embeddings.weight.grad.norm()),
        grad_norm_blocks=[f[f"grad_norm/layer_{n:02d}"] for n in range(1, N + 1)],
        grad_norm_final_norm=f["grad_norm/final_norm"],
    )


def print_result(r: dict) -> None:
    s = r["setting"]
    print(f"\n== d={s['hidden_size']} N={s['num_layers']} {s['label']} (sigma {s['sigma_value']:.4g}, "
          f"W_O/W_2 {s['output_sigma']:.4g}); initial loss {r['loss']:.3f}")
    print(f"  {'after':10s} {'std meas':>9s} {'additive':>9s} {'rel err':>8s} {'formula':>9s} {'rel err':>8s}"
          f" {'|grad| params':>14s}")
    grads = [r["grad_norm_embedding"]] + r["grad_norm_blocks"]
    for n, (m, a, fo, g) in enumerate(zip(r["residual_std"], r["residual_std_additive"],
                                          r["residual_std_formula"], grads)):
        name = "embedding" if n == 0 else f"block {n}"
        print(f"  {name:10s} {m:9.4f} {a:9.4f} {abs(a / m - 1):8.2%} {fo:9.4f} {abs(fo / m - 1):8.2%} {g:14.4g}")
    print(f"  embedding table |grad| {r['grad_norm_embedding_table']:.4g}, final LayerNorm |grad| "
          f"{r['grad_norm_final_norm']:.4g}")
    print(f"  {'LayerNorm':16s} {'std(x)':>8s} {'1/std(x)':>9s} {'|g_in|/|g_out|':>15s} {'rel err':>8s}"
          f" {'per-token 1/std_t':>18s} {'rel err':>8s} {'kept by LN':>10s}")
    for row in r["layer_norms"]:
        print(f"  {row['name']:16s} {row['input_std']:8.4f} {row['predicted']:9.3f} {row['measured']:15.3f}"
              f" {row['rel_error']:8.2%} {row['per_token']:18.3f} {abs(row['measured'] / row['per_token'] - 1):8.2%}"
              f" {row['projection_kept']:10.3f}")


def plot(results: list[dict], output_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(EMBEDDING_NORMS, ("tab:red", "tab:blue", "tab:green", "tab:orange")))
    written = []
    shapes = sorted({(r["setting"]["hidden_size"], r["setting"]["num_layers"]) for r in results})
    for d, N in shapes:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for r in (r for r in results if (r["setting"]["hidden_size"], r["setting"]["num_layers"]) == (d, N)):
            s = r["setting"]
            style = dict(color=colours[s["embedding_norm"]], linestyle="-" if s["scaled_init"] else "--",
                         marker="o" if s["sigma"] == "small" else "s", markersize=3, linewidth=1.2)
            layers = np.arange(N + 1)
            axes[0].plot(layers, r["residual_std"], label=s["label"], **style)
            axes[0].plot(layers, r["residual_std_additive"], color=style["color"], linestyle=":", linewidth=0.8)
            rows = [row for row in r["layer_norms"] if row["name"] in ("embedding.norm",) or row["name"].endswith("ln_1")]
            x = [0 if row["name"] == "embedding.norm" else int(row["name"][6:8]) for row in rows]
            axes[1].plot(x, [row["measured"] for row in rows], **style)
            axes[1].scatter(x, [row["predicted"] for row in rows], color=style["color"], marker="x", s=14)
            axes[2].plot(layers, [r["grad_norm_embedding"]] + r["grad_norm_blocks"], **style)
        axes[0].set(title="residual-stream std (dotted: additive rule)", xlabel="after block (0: embedding)",
                    ylabel="std", yscale="log")
        axes[1].set(title="LayerNorm grad amplification (x: 1/std(x))", xlabel="LN_1 of block (0: Embed LN)",
                    ylabel="|grad in| / |grad out|", yscale="log")
        axes[2].set(title="parameter gradient norm", xlabel="block (0: embedding)", ylabel="norm", yscale="log")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.suptitle(f"at initialisation, d={d}, {N} layers (detach's forward is vanilla's: its lines lie on none's)",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = os.path.join(output_dir, f"at_init_d{d}_L{N}.png")
        fig.savefig(path + ".tmp.png", dpi=80)
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        written.append(path)
    return written


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, nargs="+", required=True, help="one or more d")
    p.add_argument("--num-layers", type=int, nargs="+", required=True, help="one or more depths N")
    p.add_argument("--embedding-norm", nargs="+", choices=EMBEDDING_NORMS, default=list(EMBEDDING_NORMS))
    p.add_argument("--architecture", nargs="+", choices=ARCHITECTURES, default=["gpt2"],
                   help="gpt2 (learned positions, LayerNorm, GELU) and/or llama (rotary, RMSNorm, SwiGLU, "
                   "query groups, no biases)")
    p.add_argument("--scaled-init", nargs="+", choices=("on", "off"), default=["on"],
                   help="W_O/W_2 at sigma/sqrt(2N) (on) or sigma (off)")
    p.add_argument("--sigma", nargs="+", default=["small"],
                   help="'small' (sqrt(2/(5d)), --init-method small) and/or fixed stds, e.g. 0.0132 (the 1.7B's)")
    p.add_argument("--data-path", help="a prefix from tools/preprocess_data.py to take the tokens from "
                   "(default: uniform random tokens)")
    p.add_argument("--vocab-size", type=int, default=4096, help="the tokenizer's vocabulary size")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234, help="initialisation and token-sampling seed")
    p.add_argument("--output-dir", default="runs/stability_at_init",
                   help="write results.json and the per-shape PNGs here (default: runs/stability_at_init)")
    args = p.parse_args(argv)
    for value in args.sigma:
        if value != "small":
            try:
                ok = float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                p.error(f"--sigma: {value!r} is neither 'small' nor a positive number")
    if args.data_path and not exists(args.data_path):
        p.error(f"--data-path: {args.data_path}.bin/.idx do not exist (give the prefix preprocess_data.py wrote)")
    for flag in ("vocab_size", "batch_size", "seq_length"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        tokens, labels = token_batch(args.data_path, args.batch_size, args.seq_length, args.vocab_size, args.seed)
    except (ValueError, IndexedDatasetError) as err:
        print(f"stability_at_init.py: error: {err}", file=sys.stderr)
        return 2
    source = args.data_path or "uniform random tokens"
    settings = [Setting(d, n, m, si == "on", sg, a) for a, d, n, m, si, sg in itertools.product(
        args.architecture, args.hidden_size, args.num_layers, args.embedding_norm, args.scaled_init, args.sigma)]
    print(f"{len(settings)} configuration(s), one forward/backward each on {args.batch_size} x {args.seq_length} "
          f"tokens of {source}")
    results, started = [], time.perf_counter()
    for i, setting in enumerate(settings):
        if i:
            left = (time.perf_counter() - started) / i * (len(settings) - i)
            eta = f", about {left:.0f} s left"
        else:
            eta = ""
        print(f"[{i + 1}/{len(settings)}] d={setting.hidden_size} N={setting.num_layers} {setting.label}{eta}",
              file=sys.stderr, flush=True)
        try:
            results.append(measure(setting, tokens, labels, args.vocab_size, args.seed))
        except ValueError as err:  # e.g. a hidden size the heads do not divide
            print(f"stability_at_init.py: error: {setting.label}, d={setting.hidden_size}: {err}", file=sys.stderr)
            return 2
        print_result(results[-1])

    worst = max(((row["rel_error"], r["setting"]["label"], r["setting"]["hidden_size"], r["setting"]["num_layers"],
                  row["name"]) for r in results for row in r["layer_norms"]))
    print("\nsummary: d  N  configuration                          emb std  LN_1(1) amp  1/std  |g emb|  |g block 1|"
          "  worst LN err  worst additive-rule err")
    for r in results:
        s, first = r["setting"], next(row for row in r["layer_norms"] if row["name"] == "layer_01.ln_1")
        print(f"  {s['hidden_size']:5d} {s['num_layers']:3d}  {s['label']:38s} {r['residual_std'][0]:7.4f}"
              f" {first['measured']:11.2f} {first['predicted']:6.2f} {r['grad_norm_embedding']:8.3g}"
              f" {r['grad_norm_blocks'][0]:12.3g} {max(row['rel_error'] for row in r['layer_norms']):13.2%}"
              f" {max(r['residual_rel_error']):12.2%}")
    summary = dict(max_rel_error_ln_amplification=worst[0],
                   worst_ln_amplification=dict(label=worst[1], hidden_size=worst[2], num_layers=worst[3], norm=worst[4]),
                   max_rel_error_residual_std=max(max(r["residual_rel_error"]) for r in results),
                   tokens=source)
    os.makedirs(args.output_dir, exist_ok=True)
    summary["plots"] = plot(results, args.output_dir)
    path = os.path.join(args.output_dir, "results.json")
    write_atomically(path, json.dumps(dict(summary, results=results), indent=1))
    print(f"\nwrote {path} ({len(results)} configuration(s)) and {len(summary['plots'])} plot(s) in {args.output_dir}")
    print(json.dumps(dict(summary, results=path)))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
