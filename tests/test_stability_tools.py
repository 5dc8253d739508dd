"""The stability tools end to end: the at-init tool's LayerNorm amplification agrees with 1/std(x),
and a --quick sweep through pretrain_gpt.py tells a diverging run from a sane one, resumes (also
after an interruption), writes its report (equal to a hand computation on synthetic runs) and its
plots as PNGs."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import REPO


def run_tool(*args, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check and proc.returncode:
        pytest.fail(f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("stability")
    train = sample_dir / "c4-train.00000-of-00001.json.gz"
    run_tool("tools/train_tokenizer.py", "--input", train, "--model-prefix", out / "tok", "--vocab-size", "500")
    run_tool("tools/preprocess_data.py", "--input", train, "--output-prefix", out / "c4", "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", out / "tok.model", "--append-eod")
    return out


def test_at_init_layernorm_amplification_is_one_over_input_std(sample_data, tmp_path):
    out = run_tool("tools/stability_at_init.py", "--hidden-size", "64", "128", "--num-layers", "2", "4",
                   "--embedding-norm", "none", "layernorm", "scaled", "detach", "--scaled-init", "on", "off",
                   "--sigma", "small", "0.0132", "--data-path", sample_data / "c4_text_document",
                   "--vocab-size", "500", "--batch-size", "2", "--seq-length", "64", "--output-dir", tmp_path)
    # The terminal gets tables, progress and a short last line; the figures go to results.json.
    last = out.stdout.strip().splitlines()[-1]
    assert len(last) < 1000 and json.loads(last)["results"] == str(tmp_path / "results.json")
    assert "[64/64] d=128 N=4" in out.stderr and "s left" in out.stderr
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["max_rel_error_ln_amplification"] == json.loads(last)["max_rel_error_ln_amplification"]
    assert len(summary["results"]) == 2 * 2 * 4 * 2 * 2
    for r in summary["results"]:
        s = r["setting"]
        if s["scaled_init"]:  # the product's init: 1/std(x) of the whole input within 10% on every row
            assert all(row["rel_error"] < 0.10 for row in r["layer_norms"]), s
        for row in r["layer_norms"]:
            # Exactly: 1/std_t token by token, times the share of the gradient LayerNorm's backward
            # keeps (it removes g's mean and its component along the normalised input).
            assert row["measured"] == pytest.approx(row["per_token"] * row["projection_kept"], rel=0.01), (s, row)
            # Token by token 1/std_t holds where 1/std of the whole input may not (with plain init the
            # first block's attention output, unaveraged at early positions, spreads the tokens' stds);
            # only the final LayerNorm's gradient, through the tied output layer, leans towards x.
            if row["name"] != "final_norm":
                assert row["projection_kept"] > 0.95, (s, row)
        assert max(r["residual_rel_error"]) < 0.10, s  # var_n = var_0 + sum of the sub-layers' variances
        first = r["layer_norms"][0]
        if s["embedding_norm"] == "layernorm":  # Embed LN reads E + P (std sqrt(2) sigma) ...
            assert first["name"] == "embedding.norm" and first["measured"] > 0.6 / s["sigma_value"]
            assert r["residual_std"][0] == pytest.approx(1.0, abs=0.02)  # ... and hands the blocks std 1
        else:
            assert first["name"] == "layer_01.ln_1"
        assert r["residual_std_formula"][0] == pytest.approx(r["residual_std"][0], rel=0.1)
    assert sorted(p.rsplit("/", 1)[1] for p in summary["plots"]) == [
        "at_init_d128_L2.png", "at_init_d128_L4.png", "at_init_d64_L2.png", "at_init_d64_L4.png"]
    for path in summary["plots"]:
        Image.open(path).verify()


def test_at_init_llama_norms_amplify_by_one_over_input_rms(sample_data, tmp_path):
    """The same mechanisms on a Llama-style model (rotary positions, RMSNorm, SwiGLU, query groups, no
    biases): every RMSNorm multiplies the gradient by 1/rms_t token by token (times the share its
    backward keeps), within 10% of 1/rms of the whole input on every Embed LN and Scaled Embed row but
    the final norm's with small init, and the residual stream follows the additive rule and the
    closed form (no position table: var_0 = sigma^2, d sigma^2 or 1)."""
    out = run_tool("tools/stability_at_init.py", "--architecture", "llama", "--hidden-size", "64", "128",
                   "--num-layers", "2", "4", "--embedding-norm", "none", "layernorm", "scaled", "detach",
                   "--sigma", "small", "0.0134", "--data-path", sample_data / "c4_text_document",
                   "--vocab-size", "500", "--batch-size", "2", "--seq-length", "64", "--output-dir", tmp_path).stdout
    assert json.loads(out.strip().splitlines()[-1])["results"] == str(tmp_path / "results.json")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert len(summary["results"]) == 2 * 2 * 4 * 2
    for r in summary["results"]:
        s = r["setting"]
        assert s["architecture"] == "llama"
        for row in r["layer_norms"]:
            assert row["measured"] == pytest.approx(row["per_token"] * row["projection_kept"], rel=0.01), (s, row)
            fix = s["embedding_norm"] in ("layernorm", "scaled")
            if fix and not (row["name"] == "final_norm" and s["sigma"] == "small"):
                assert row["rel_error"] < 0.10, (s, row)
        assert max(r["residual_rel_error"]) < 0.10, s
        assert r["residual_std_formula"][0] == pytest.approx(r["residual_std"][0], rel=0.1), s


def test_at_init_refuses_bad_flags_in_one_line():
    proc = run_tool("tools/stability_at_init.py", "--hidden-size", "64", "--num-layers", "2", "--sigma", "big",
                    check=False)
    assert proc.returncode == 2 and "--sigma: 'big' is neither 'small' nor a positive number" in proc.stderr


def test_quick_sweep_reports_divergence_resumes_and_plots(sample_data, tmp_path):
    data = ["--data-path", sample_data / "c4_text_document", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sample_data / "tok.model"]
    sweep = tmp_path / "sweep"
    out = run_tool("tools/stability_sweep.py", *data, "--output-dir", sweep, "--quick", "--jobs", "2").stdout
    summary = json.loads((sweep / "summary.json").read_text())
    assert len(summary) == 4 and {(r["method"], r["embedding_norm"], r["lr"]) for r in summary} == {
        ("vanilla", "none", 3e-3), ("vanilla", "none", 1.0), ("embed-ln", "layernorm", 3e-3),
        ("embed-ln", "layernorm", 1.0)}
    for r in summary:
        assert r["status"] == "done" and r["steps"] == 30, r
        assert r["max_grad_norm"] > 0 and r["max_grad_norm_source"] in ("embedding", "blocks", "final_norm")
        assert 0 < r["mean_embedding_grad_share"] < 1 and r["tokens_per_s"] > 0 and 0 < r["cpu_s"]
        assert isinstance(r["loss_spikes"], int) and isinstance(r["grad_norm_spikes"], int)
        assert (sweep / "runs" / r["name"] / "tensorboard").is_dir()
        command = (sweep / "runs" / r["name"] / "command.txt").read_text()
        assert f"--embedding-norm {r['embedding_norm']} " in command and "--weight-decay 0 " in command
        if r["lr"] == 1.0:  # Adam at lr 1 without clipping: deliberately unstable
            assert r["diverged"], r
        else:
            assert not r["diverged"] and r["final_train_loss"] < r["first_loss"], r
            assert r["best_valid_ppl"] <= r["final_valid_ppl"] < math.exp(r["first_loss"])
    csv_lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("name,architecture,method,embedding_norm,lr,seed,")

    # The report: one row per method, its sensitivity from the runs' own losses (one seed: no spread,
    # so no comparison), the unigram level of the data beside it, the figure a PNG.
    report = json.loads((sweep / "report.json").read_text())
    assert f"wrote {sweep / 'report.md'}" in out and report["runs"] == 4 and report["comparisons"] == []
    by_method = {r["method"]: r for r in report["methods"]}
    for method, row in by_method.items():
        runs = {r["lr"]: r for r in summary if r["method"] == method}
        initial = (runs[3e-3]["first_loss"] + runs[1.0]["first_loss"]) / 2
        capped = [min(r["final_valid_loss"], initial) for r in runs.values()]
        assert row["lr_sensitivity"]["mean"] == pytest.approx(sum(capped) / 2 - min(capped))
        assert row["lr_sensitivity"]["n"] == 1 and row["runs"] == 2 and row["diverged"] == 1
    level = report["unigram"]
    assert level["split"] == "80,20,0" and 0 < level["loss"] < math.log(500) + 0.01
    with Image.open(sweep / "final_loss_vs_lr.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert "| gpt2 | vanilla |" in (sweep / "report.md").read_text()

    again = run_tool("tools/stability_sweep.py", *data, "--output-dir", sweep, "--quick").stdout
    assert "4 runs in the grid: 4 already finished, 0 to run" in again
    assert json.loads((sweep / "summary.json").read_text()) == summary
    (sweep / "report.json").unlink()
    run_tool("tools/stability_sweep.py", *data, "--output-dir", sweep, "--quick", "--report-only")
    assert json.loads((sweep / "report.json").read_text()) == report

    out = run_tool("tools/plot_stability.py", sweep, "--output-dir", tmp_path / "png").stdout
    written = sorted(p.name for p in (tmp_path / "png").iterdir())
    group = "sigmasmall_L2_wu0_b20.999_clip0"
    assert written == sorted(f"{group}-{kind}.png" for kind in ("loss", "grad_norm", "valid_ppl_vs_lr", "monitor_lr1"))
    for name in written:
        with Image.open(tmp_path / "png" / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
        assert f"wrote {tmp_path / 'png' / name}" in out


def _processes_naming(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_interrupted_sweep_leaves_no_run_behind_and_resumes(sample_data, tmp_path):
    """SIGTERM (a time limit, the GPU script's `timeout`) while runs are in flight: the sweep kills
    its pretrain_gpt.py processes and exits; run again, it keeps the finished runs and redoes the
    interrupted one from scratch."""
    data = ["--data-path", sample_data / "c4_text_document", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", sample_data / "tok.model"]
    sweep = tmp_path / "sweep"
    args = [sys.executable, "tools/stability_sweep.py", *map(str, data), "--output-dir", str(sweep), "--quick"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    def in_flight():
        return [d for d in sweep.glob("runs/*") if (d / "train.log").exists() and not (d / "result.json").exists()]

    deadline = time.time() + 240
    while not (list(sweep.glob("runs/*/result.json")) and in_flight()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    assert len(in_flight()) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _processes_naming(str(sweep / "runs")) == []
    finished = len(list(sweep.glob("runs/*/result.json")))
    assert 1 <= finished < 4
    again = run_tool("tools/stability_sweep.py", *data, "--output-dir", sweep, "--quick").stdout
    assert f"4 runs in the grid: {finished} already finished, {4 - finished} to run" in again
    assert len(json.loads((sweep / "summary.json").read_text())) == 4


def _result(method, lr, seed, final, first=8.0, spikes=0):
    setting = "sigma0.0132_L4_wu30_b20.95_clip1"
    return dict(name=f"gpt2_{method}_lr{lr:g}_seed{seed}_{setting}", method=method, architecture="gpt2", lr=lr,
                seed=seed, setting=setting, first_loss=first, final_valid_loss=final, diverged=final is None,
                loss_spikes=spikes, grad_norm_spikes=0)


def test_report_from_synthetic_runs_equals_a_hand_computation(sample_data, tmp_path):
    """Two methods, two learning rates, three seeds (and a fourth seed of B missing a learning
    rate), every run's initial loss 8. By hand, per seed: sensitivity = mean of min(final, 8) over
    the grid - the best final; a missing final loss counts as 8.
    A: seeds (6.0, 5.0) (6.2, 5.2) (6.1, none): 0.5, 0.5, 7.05 - 6.1 = 0.95 -> mean 0.65, std sqrt(0.0675);
    B: seeds (7.0, 6.9) (7.1, 9.5 -> 8) (7.2, 7.0): 0.05, 7.55 - 7.1 = 0.45, 0.1 -> mean 0.2;
    ranges [0.5, 0.95] and [0.05, 0.45] do not overlap: beyond the seed spread; so do the best
    losses (5.0-6.1 against 6.9-7.1)."""
    finals = {("A", 1): (6.0, 5.0), ("A", 2): (6.2, 5.2), ("A", 3): (6.1, None),
              ("B", 1): (7.0, 6.9), ("B", 2): (7.1, 9.5), ("B", 3): (7.2, 7.0)}
    results = [_result(m, lr, seed, f, spikes=1 if f is None else 0)
               for (m, seed), pair in finals.items() for lr, f in zip((1e-3, 1e-2), pair)]
    results.append(_result("B", 1e-3, 4, 7.3))
    sweep = tmp_path / "sweep"
    for r in results:
        (sweep / "runs" / r["name"]).mkdir(parents=True)
        (sweep / "runs" / r["name"] / "result.json").write_text(json.dumps(r))
    run_tool("tools/stability_sweep.py", "--data-path", sample_data / "c4_text_document", "--tokenizer-type",
             "SentencePieceTokenizer", "--output-dir", sweep, "--split", "80,20,0", "--report-only")
    report = json.loads((sweep / "report.json").read_text())
    a, b = report["methods"]
    assert (a["method"], b["method"]) == ("A", "B") and b["incomplete_seeds"] == [4] and a["incomplete_seeds"] == []
    assert a["lr_sensitivity"] == pytest.approx(dict(mean=0.65, std=math.sqrt(0.0675), min=0.5, max=0.95, n=3))
    assert b["lr_sensitivity"] == pytest.approx(dict(mean=0.2, std=math.sqrt(((-0.15) ** 2 + 0.25 ** 2 + 0.1 ** 2) / 2),
                                                     min=0.05, max=0.45, n=3))
    assert a["best_loss"] == pytest.approx(dict(mean=16.3 / 3, std=math.sqrt(1.03 / 3), min=5.0, max=6.1, n=3))
    assert b["best_loss"]["min"] == pytest.approx(6.9) and b["best_loss"]["max"] == pytest.approx(7.1)
    b_low = b["per_lr"][0]
    assert b_low["lr"] == 1e-3 and b_low["runs"] == 4 and b_low["final_valid_loss"]["mean"] == pytest.approx(7.15)
    a_high = a["per_lr"][1]
    assert a_high["no_final_loss"] == 1 and a_high["diverged"] == 1 and a_high["loss_spikes"] == 1
    assert a_high["final_valid_loss"]["mean"] == pytest.approx(5.1)
    sens, best = report["comparisons"]
    assert (sens["figure"], sens["first"], sens["second"]) == ("lr_sensitivity", "A", "B")
    assert sens["difference"] == pytest.approx(0.45) and sens["exceeds_seed_spread"]
    combined = math.sqrt(a["lr_sensitivity"]["std"] ** 2 + b["lr_sensitivity"]["std"] ** 2)
    assert sens["z"] == pytest.approx(0.45 / combined)
    assert best["figure"] == "best_loss" and best["exceeds_seed_spread"]
    markdown = (sweep / "report.md").read_text()
    assert "| gpt2 | A | 0.650 ± 0.260 [0.500, 0.950] |" in markdown
    assert "2 of 2 pairs exceed the seed spread" in markdown
    with Image.open(sweep / "final_loss_vs_lr.png") as image:
        assert image.format == "PNG"


def test_report_reads_the_sweeps_before_methods(sample_data, tmp_path):
    """A result.json written before the method axis (embedding modes only, no architecture) is
    reported under the method of its mode and its setting."""
    old = dict(name="none_lr0.01_seed1_sigma0.0132_L6_wu10_b20.999_clip1", embedding_norm="none", lr=0.01, seed=1,
               sigma="0.0132", num_layers=6, lr_warmup_iters=10, adam_beta2=0.999, clip_grad=1.0, first_loss=8.3,
               final_valid_loss=6.9, diverged=False, loss_spikes=2, grad_norm_spikes=0)
    (tmp_path / "runs" / old["name"]).mkdir(parents=True)
    (tmp_path / "runs" / old["name"] / "result.json").write_text(json.dumps(old))
    run_tool("tools/stability_sweep.py", "--data-path", sample_data / "c4_text_document", "--tokenizer-type",
             "SentencePieceTokenizer", "--output-dir", tmp_path, "--split", "80,20,0", "--report-only")
    (row,) = json.loads((tmp_path / "report.json").read_text())["methods"]
    assert (row["architecture"], row["method"]) == ("gpt2", "vanilla")
    assert row["setting"] == "sigma0.0132_L6_wu10_b20.999_clip1"
    assert row["best_loss"]["mean"] == 6.9 and row["loss_spikes"] == 2


def test_unigram_level_is_the_cross_entropy_of_training_frequencies(tmp_path):
    """Training document [0, 0, 1], validation document [0, 1]: with add-1/2 smoothing the training
    frequencies are 2.5/4 and 1.5/4, so the loss is -(ln 0.625 + ln 0.375) / 2."""
    from megatron_snm.analysis.unigram import unigram_loss
    from megatron_snm.data.indexed_dataset import IndexedDatasetBuilder

    with IndexedDatasetBuilder(str(tmp_path / "d")) as builder:
        builder.add_document([0, 0, 1])
        builder.add_document([0, 1])
        builder.finalize()
    level = unigram_loss(str(tmp_path / "d"), "50,50,0")
    assert level["loss"] == pytest.approx(-(math.log(0.625) + math.log(0.375)) / 2)
    assert (level["train_tokens"], level["valid_tokens"]) == (3, 2)


def test_sweep_refuses_a_bad_run_configuration(sample_data, tmp_path):
    proc = run_tool("tools/stability_sweep.py", "--data-path", tmp_path / "missing", "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", sample_data / "tok.model", "--output-dir",
                    tmp_path / "sweep", "--quick", check=False)
    assert proc.returncode == 2 and "was refused (exit status 2)" in proc.stderr
    assert "missing.bin does not exist" in proc.stderr


def test_gradient_attribution_counts_the_final_layernorm():
    """The sweep's case: the final LayerNorm holds 96% of the gradient norm squared; the rest is the
    embedding's 3% and the blocks' 1%. The largest share decides, not embedding against blocks."""
    from megatron_snm.analysis.run_history import gradient_attribution

    figures = {"grad_norm/embedding": math.sqrt(3.0), "grad_norm/layer_01": math.sqrt(0.5),
               "grad_norm/layer_02": math.sqrt(0.5), "grad_norm/final_norm": math.sqrt(96.0)}
    got = gradient_attribution(figures)
    assert got["source"] == "final_norm" and got["final_norm_share"] == pytest.approx(0.96)
    assert got["embedding_share"] == pytest.approx(0.03) and got["largest_block"] in ("layer_01", "layer_02")
    assert gradient_attribution({**figures, "grad_norm/final_norm": 0.0})["source"] == "embedding"
    assert gradient_attribution({"grad_norm/embedding": 0.1, "grad_norm/layer_01": 1.0})["source"] == "blocks"
