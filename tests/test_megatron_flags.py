"""Megatron-LM / Megatron-DeepSpeed flags with Megatron's meaning (docs/megatron_flags.md): the LR
schedules against hand-computed curves, the exit conditions (a real SIGTERM included), --finetune
and --no-load-*, the resumed-schedule rule, the fp16 loss scaler in the DeepSpeed config, wandb
offline, and every refused flag failing before any process group with what to do instead.

The runs share two launched jobs (DeepSpeed's start-up is paid once per job)."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from megatron_snm.config import parse_args, resolve
from megatron_snm.config.errors import ConfigError
from megatron_snm.parallel.spawn import run_distributed
from megatron_snm.training.exit_conditions import EXIT_RESUMABLE
from megatron_snm.training.lr_schedule import lr_schedule
from tests.training_harness import SEQ, TINY, run_configs

REPO = Path(__file__).resolve().parents[1]
GBS = 8  # TINY's global batch
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]


def tiny(*changes: str) -> list[str]:
    """TINY without its LR schedule and run length (each test gives its own), plus `changes`."""
    argv, dropped = [], {"--train-iters", "--lr-warmup-iters", "--min-lr"}
    for i in range(0, len(TINY), 2):
        if TINY[i] not in dropped:
            argv += TINY[i:i + 2]
    return argv + ["--min-lr", "3e-4", *changes]


# --- LR schedules against hand-computed curves ---------------------------------------------
def cosine(lr, min_lr, progress, warmup, decay, init=0.0):
    if warmup and progress <= warmup:
        return init + (lr - init) * progress / warmup
    if progress >= decay:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (decay - warmup)))


def linear(lr, min_lr, progress, warmup, decay, init=0.0):
    if warmup and progress <= warmup:
        return init + (lr - init) * progress / warmup
    return min_lr if progress >= decay else lr - (lr - min_lr) * (progress - warmup) / (decay - warmup)


# flags, iterations, expected lr of iteration `it` (lr 3e-3, min 3e-4, global batch 8, sequence 16)
SCHEDULES = {
    # Megatron-LM's 175B script: warm-up over a fraction of --lr-decay-iters (16 x 8 samples -> 32).
    "iterations + warm-up fraction": (
        ["--train-iters", "20", "--lr-decay-iters", "16", "--lr-warmup-fraction", "0.25"], 20,
        lambda it: cosine(3e-3, 3e-4, it * GBS, 0.25 * 16 * GBS, 16 * GBS)),
    "samples, linear, warm-up init": (
        ["--train-samples", "160", "--lr-warmup-samples", "24", "--lr-decay-samples", "120",
         "--lr-decay-style", "linear", "--lr-warmup-init", "1e-4"], 20,
        lambda it: linear(3e-3, 3e-4, it * GBS, 24, 120, init=1e-4)),
    # Megatron-DeepSpeed's GPT scripts: --train-samples sets the length, tokens the schedule.
    "tokens (Megatron-DeepSpeed)": (
        ["--train-samples", "160", "--train-tokens", "100000", "--lr-warmup-tokens", "300",
         "--lr-decay-tokens", "2000"], 20,
        lambda it: cosine(3e-3, 3e-4, it * GBS * SEQ, 300, 2000)),
    "iteration warm-up, token decay": (
        ["--train-iters", "20", "--lr-warmup-iters", "3", "--lr-decay-tokens", "2000"], 20,
        lambda it: cosine(3e-3, 3e-4, it * GBS * SEQ, 3 * GBS * SEQ, 2000)),
    "inverse square root": (
        ["--train-iters", "20", "--lr-warmup-iters", "4", "--lr-decay-style", "inverse-square-root"], 20,
        lambda it: 3e-3 * it * GBS / (4 * GBS) if it <= 4 else max(3e-4, 3e-3 * math.sqrt(4 * GBS / (it * GBS)))),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_flags_follow_the_hand_computed_curve(name):
    flags, iterations, expected = SCHEDULES[name]
    run = resolve(parse_args(tiny(*flags)), 1)
    assert run.batch.train_iters == iterations
    schedule = lr_schedule(run)
    got = [schedule(it * GBS * run.lr_schedule.per_sample) for it in range(1, iterations + 1)]
    assert got == pytest.approx([expected(it) for it in range(1, iterations + 1)], rel=1e-12, abs=1e-15)


def test_train_tokens_beside_train_samples_stops_early():
    run = resolve(parse_args(tiny("--train-samples", "160", "--train-tokens", "600")), 1)
    assert run.batch.train_iters == math.ceil(600 / (GBS * SEQ))  # 5 steps of 128 tokens reach 600
    assert run.lr_schedule.decay == 160  # the schedule still spans --train-samples, as in Megatron-DeepSpeed


# --- flags refused, or accepted with no effect, before any process group ------------------------
@pytest.mark.parametrize("flags, message", [
    (["--num-experts", "8"], "--num-experts is not supported: mixture-of-experts"),
    (["--context-parallel-size", "2"], "--context-parallel-size is not supported: context parallelism"),
    (["--fp8-format", "hybrid"], "--fp8-format is not supported: fp8 needs Transformer Engine, which is not used "
                                 "here; use --bf16"),
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--decoupled-lr", "1e-4", "--decoupled-min-lr", "1e-3"], "--decoupled-min-lr (0.001) must be in [0, "
                                                               "--decoupled-lr (0.0001)]"),
    (["--tokenizer-type", "NullTokenizer"], "--tokenizer-type NullTokenizer needs --vocab-size N"),
    (["--mock-data", "--data-path", "x"], "--mock-data trains on synthetic documents, --data-path on a corpus"),
    (["--profile"], "--profile writes its trace into --tensorboard-dir"),
    (["--profile", "--profile-step-start", "3", "--profile-step-end", "3", "--tensorboard-dir", "tb"],
     "--profile-step-start (3) must be >= 0 and less than --profile-step-end (3)"),
    (["--step-batch-size-schedule", "0:16 1B:32"], "the global batch size is fixed"),
    (["--optimizer", "sgd"], "--optimizer sgd is not supported"),
    (["--data-impl", "lazy"], "--data-impl lazy is not supported"),
    (["--distributed-backend", "nccl" if not torch.cuda.is_available() else "gloo"], "give --distributed-backend"),
    (["--max-position-embeddings", "16"], "--max-position-embeddings (16) must be >= --seq-length (32)"),
    (["--recompute-activations", "--recompute-granularity", "full"], "--recompute-activations means"),
    (["--recompute-method", "block"], "need --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
     "--recompute-num-layers (3) must be in 1..--num-layers (2)"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "give one warm-up length"),
    (["--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"], "mutually exclusive"),
    (["--initial-loss-scale", "1000"], "--initial-loss-scale must be a power of 2"),
    (["--embed-layernorm", "--embedding-norm", "scaled"], "--embed-layernorm (BLOOM's name"),
    (["--train-samples", "4", "--global-batch-size", "8"], "--train-samples (4) is less than one"),
])
def test_refused_before_any_process_group(flags, message, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    argv = SHAPE + (["--train-iters", "10"] if "--train-samples" not in flags else []) + flags
    assert pretrain_gpt.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="PyTorch has no memory-efficient SDPA kernel on CPU")
def test_attention_kernel_the_device_lacks_falls_back_to_auto_with_a_note():
    """A GPU script's --attention-backend fused runs on CPU (the kernel changes the speed, not the
    attention computed: test_attention_backends_compute_the_same_attention)."""
    run = resolve(parse_args(SHAPE + ["--train-iters", "1", "--attention-backend", "fused"]), 1)
    assert run.model.attention_backend == "auto"
    assert [note for note in run.notes if note.startswith("--attention-backend fused has no effect: cpu has no "
                                                          "EFFICIENT_ATTENTION kernel")], run.notes


def test_attention_kernel_that_cannot_take_the_model_is_refused(monkeypatch):
    """A kernel the device has, but not for this head size / dtype / dropout, is a wrong configuration."""
    import importlib

    from megatron_snm.model.attention import check_attention_backend

    resolve_module = importlib.import_module("megatron_snm.config.resolve")  # the package exports the function

    def only_the_plain_case(backend, device, dtype, head_dim, dropout):
        if head_dim != 64:
            raise ValueError(f"--attention-backend {backend} is not available for head size {head_dim}")
        check_attention_backend("auto", device, dtype, head_dim, dropout)

    monkeypatch.setattr(resolve_module, "check_attention_backend", only_the_plain_case)
    with pytest.raises(ConfigError, match=r"--attention-backend flash is not available for head size 16"):
        resolve(parse_args(SHAPE + ["--train-iters", "1", "--attention-backend", "flash"]), 1)


def test_attention_backends_compute_the_same_attention():
    from megatron_snm.model.config import GPTConfig
    from megatron_snm.model.gpt import GPTModel, gpt_loss
    from tests.model_shapes import tiny as tiny_shape

    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for backend in ("unfused", "flash", "auto"):
        model = GPTModel(GPTConfig(**tiny_shape(attention_backend=backend)))
        loss = gpt_loss(model(tokens), tokens.roll(-1, 1))
        loss.backward()
        losses[backend], grads[backend] = loss.item(), {n: p.grad for n, p in model.named_parameters()}
    for backend in ("flash", "auto"):
        assert losses[backend] == pytest.approx(losses["unfused"], rel=1e-5)
        for n, g in grads[backend].items():
            torch.testing.assert_close(g, grads["unfused"][n], rtol=1e-4, atol=1e-6)


def test_no_effect_flags_say_so_and_aliases_resolve():
    run = resolve(parse_args(SHAPE + [
        "--train-iters", "10", "--data-impl", "mmap", "--no-async-tensor-model-parallel-allreduce",
        "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--tensorboard-queue-size", "1",
        "--distributed-backend", "nccl" if torch.cuda.is_available() else "gloo", "--no-pipeline-parallel",
        "--checkpoint-activations", "--deepspeed-activation-checkpointing", "--use-flash-attn", "--embed-layernorm",
        "--use-distributed-optimizer", "--vocab-file", "v.json", "--merge-file", "m.txt", "--sequence-parallel"]), 2)
    for flag in ("--data-impl mmap", "--no-async-tensor-model-parallel-allreduce", "--no-masked-softmax-fusion",
                 "--no-bias-gelu-fusion", "--tensorboard-queue-size 1", "--distributed-backend",
                 "--no-pipeline-parallel", "--sequence-parallel"):
        assert sum(note.startswith(flag) and "has no effect" in note for note in run.notes) == 1, (flag, run.notes)
    model = run.model
    assert (model.recompute_granularity, model.recompute_method, model.recompute_num_layers) == ("full", "uniform", 1)
    assert model.attention_backend == "flash" and model.embedding_norm == "layernorm"
    assert run.parallel.zero_stage == 1  # Megatron's distributed optimizer = ZeRO-1
    assert run.data.tokenizer_type == "GPT2BPETokenizer"  # Megatron's scripts give only vocab + merges
    assert resolve(parse_args(SHAPE + ["--train-iters", "1", "--recompute-activations"]), 1).model \
        .recompute_granularity == "selective"


def test_fp16_loss_scaler_flags_reach_deepspeed(tmp_path):
    flags = ["--train-iters", "1", "--fp16", "--initial-loss-scale", "2048", "--min-loss-scale", "2",
             "--loss-scale-window", "500", "--hysteresis", "3"]
    fp16 = resolve(parse_args(SHAPE + flags), 1).deepspeed["fp16"]
    assert fp16 == {"enabled": True, "initial_scale_power": 11, "min_loss_scale": 2.0, "loss_scale_window": 500,
                    "hysteresis": 3}
    # Megatron-DeepSpeed's template JSON says the same: agreed. A contradiction names the flag and the file.
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500,
                                             "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 11}}))
    fp16 = resolve(parse_args(SHAPE + ["--train-iters", "1", "--hysteresis", "2", "--deepspeed_config",
                                       str(template)]), 1).deepspeed["fp16"]
    assert (fp16["initial_scale_power"], fp16["loss_scale_window"], fp16["hysteresis"]) == (11, 500, 2)
    with pytest.raises(ConfigError, match=f"--hysteresis 3 conflicts with {template}, which says 2"):
        resolve(parse_args(SHAPE + flags[:2] + ["--hysteresis", "3", "--deepspeed_config", str(template)]), 1)


# --- real runs: one job for the trainer's flags ------------------------------------------------
def _trainer_runs(tmp: Path) -> dict[str, list[str]]:
    sched = ["--train-iters", "6", "--lr-warmup-iters", "2"]
    return {
        "samples schedule": tiny("--train-samples", "48", "--lr-warmup-samples", "24", "--lr-decay-samples", "40",
                                 "--lr-decay-style", "linear", "--lr-warmup-init", "1e-4"),
        "exit interval": tiny("--train-iters", "6", "--exit-interval", "2", "--save", str(tmp / "interval")),
        "exit duration": tiny("--train-iters", "6", "--exit-duration-in-mins", "1e-9", "--save", str(tmp / "dur")),
        "wandb": tiny(*sched, "--wandb-project", "megatron-snm-test", "--wandb-exp-name", "tiny",
                      "--wandb-save-dir", str(tmp / "wandb"), "--tensorboard-dir", str(tmp / "tb"),
                      "--log-validation-ppl-to-tensorboard", "--log-timers-to-tensorboard",
                      "--log-batch-size-to-tensorboard", "--log-memory-to-tensorboard", "--log-throughput",
                      "--log-world-size-to-tensorboard", "--log-optimizer-states-to-tensorboard",
                      "--num-workers", "1"),
        # The uninterrupted run the SIGTERM test's killed + resumed one must equal (and the checkpoint
        # the schedule rules load).
        "reference": tiny("--train-iters", "6", "--lr-warmup-iters", "2", "--save", str(tmp / "ref"),
                          "--save-interval", "3"),
        "schedule differs": tiny("--train-iters", "8", "--lr-warmup-iters", "2", "--lr", "1e-3",
                                 "--load", str(tmp / "ref"), "--save", str(tmp / "x1")),
        "override": tiny("--train-iters", "8", "--lr-warmup-iters", "2", "--lr", "1e-3", "--load", str(tmp / "ref"),
                         "--save", str(tmp / "x2"), "--override-opt_param-scheduler"),
        "use checkpoint's": tiny("--train-iters", "8", "--lr-warmup-iters", "2", "--lr", "1e-3",
                                 "--load", str(tmp / "ref"), "--save", str(tmp / "x3"),
                                 "--use-checkpoint-opt_param-scheduler"),
    }


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    runs = _trainer_runs(tmp)
    with pytest.MonkeyPatch.context() as env:  # inherited by the spawned rank; nothing leaves the machine
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        return tmp, dict(zip(runs, run_configs(1, list(runs.values()))))


def test_sample_schedule_in_a_real_run(trainer_runs):
    result = trainer_runs[1]["samples schedule"]
    assert sorted(result.lrs) == list(range(1, 7))
    assert [result.lrs[it] for it in range(1, 7)] == pytest.approx(
        [linear(3e-3, 3e-4, it * GBS, 24, 40, init=1e-4) for it in range(1, 7)], rel=1e-12)


def test_exit_interval_and_duration_save_and_stop(trainer_runs):
    tmp, runs = trainer_runs
    assert runs["exit interval"].stopped == "interval" and runs["exit interval"].iteration == 2
    assert (tmp / "interval" / "latest").read_text() == "iter_0000002"
    assert runs["exit duration"].stopped == "duration" and runs["exit duration"].iteration == 1
    assert (tmp / "dur" / "latest").read_text() == "iter_0000001"


def test_wandb_offline_logs_the_tensorboard_scalars(trainer_runs):
    """The offline run's log (protobuf records: each history item holds its tag and its value as JSON
    text) holds every TensorBoard tag, and the last step's loss exactly as logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, runs = trainer_runs
    logs = list((tmp / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, list((tmp / "wandb").rglob("*"))
    record = logs[0].read_bytes()
    events = EventAccumulator(str(tmp / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("lm-loss-training/lm loss", "learning-rate/learning-rate", "grad-norm/grad-norm",
                "lm-loss-validation/lm loss ppl", "timers/train-step-time", "timers/evaluate-time",
                "batch-size/batch-size", "memory/mem-rss-bytes", "throughput/throughput", "world-size/world-size",
                "optimizer/momentum_l2", "optimizer/variance_l2"):
        assert tag in tags and tag.encode() in record, tag
    assert events.Scalars("lm-loss-training/lm loss")[-1].value == pytest.approx(runs["wandb"].losses[6], rel=1e-6)
    assert json.dumps(runs["wandb"].losses[6]).encode() in record
    assert [e.value for e in events.Scalars("batch-size/batch-size")] == [GBS] * 6


def test_resumed_schedule_must_agree_unless_told(trainer_runs):
    runs = trainer_runs[1]
    err = runs["schedule differs"]
    assert isinstance(err, ConfigError) and "--override-opt_param-scheduler" in str(err) and "max_lr" in str(err)
    this_runs, checkpoints = lr_schedule(resolve(parse_args(_trainer_runs(Path("/x"))["override"]), 1)), \
        lr_schedule(resolve(parse_args(_trainer_runs(Path("/x"))["reference"]), 1))
    assert this_runs(7 * GBS) != pytest.approx(checkpoints(7 * GBS))
    assert runs["override"].lrs[7] == pytest.approx(this_runs(7 * GBS), rel=1e-12)
    assert runs["use checkpoint's"].lrs[7] == pytest.approx(checkpoints(7 * GBS), rel=1e-12)
    assert sorted(runs["override"].lrs) == [7, 8]  # resumed from the reference's last checkpoint (iteration 6)


# --- --exit-signal-handler: a real SIGTERM ------------------------------------------------------
def test_sigterm_saves_exits_4_and_the_resumed_run_continues_exactly(trainer_runs, tmp_path):
    """SIGTERM mid-run (a second one during the save): the step finishes, a checkpoint is written, the
    exit status is 4; the same command with --load then ends with the uninterrupted run's losses."""
    reference = trainer_runs[1]["reference"]
    save = tmp_path / "ckpt"
    argv = [sys.executable, "-m", "tests.training_harness",
            *tiny("--train-iters", "6", "--lr-warmup-iters", "2", "--log-interval", "1", "--exit-signal-handler",
                  "--save", str(save))]
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGATRON_SNM_TEST_SLEEP_IN_SAVE="1:3,2:3,3:3")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r" iteration +1/ +6 \|", line):
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.5)  # inside the save of the step after (it sleeps 3 s before publishing)
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_RESUMABLE, "".join(lines[-30:])
    log = "".join(lines)
    stopped = int(re.search(r"exiting at iteration (\d+): received SIGTERM", log).group(1))
    assert stopped < 6 and (save / "latest").read_text() == f"iter_{stopped:07d}"
    assert not list(save.glob("*.tmp"))

    resumed = subprocess.run([*argv, "--load", str(save)], cwd=REPO, env=dict(env, MEGATRON_SNM_TEST_SLEEP_IN_SAVE=""),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    losses = {int(it): float(loss) for it, loss in
              re.findall(r" iteration +(\d+)/ +6 \|.*? lm loss: (\S+) \|", log + resumed.stdout)}
    assert f"loaded checkpoint {save} at iteration {stopped}" in resumed.stdout
    assert sorted(losses) == list(range(1, 7))
    assert [losses[it] for it in range(1, 7)] == [float(f"{reference.losses[it]:.6E}") for it in range(1, 7)]


# --- --finetune and --no-load-optim / --no-load-rng --------------------------------------------
def _load_body(rank, world_size, tmp):
    from megatron_snm.parallel import state
    from megatron_snm.training.trainer import build_run
    from tests.training_harness import VOCAB, token_samples

    torch.set_num_threads(1)

    def trainer(*flags):
        return build_run(resolve(parse_args(tiny("--train-iters", "3", "--zero-stage", "1", *flags)), world_size),
                         VOCAB)

    def weights(t):
        return {n: p.detach().clone() for n, p in t.engine.model.named_parameters()}

    def moments(t):  # DeepSpeed's ZeRO creates zero moments at start-up; loaded ones are not zero
        return sum(float(s["exp_avg"].abs().sum()) for s in t.engine.optimizer.state.values() if s)

    first = trainer("--save", tmp)
    first.train((token_samples(24, 1), None, None))
    saved = weights(first)
    out = {"saved moments": moments(first)}
    state.destroy_model_parallel()
    for name, flags in {"finetune": ["--finetune"], "no-load-optim": ["--no-load-optim", "--no-load-rng"],
                        "full": []}.items():
        t = trainer("--load", tmp, *flags)
        t.load()
        loaded = weights(t)
        out[name] = dict(same_weights=loaded.keys() == saved.keys() and all(torch.equal(loaded[n], w)
                                                                          for n, w in saved.items()),
                         moments=moments(t), iteration=t.iteration, samples=t.consumed_samples)
        state.destroy_model_parallel()
    return out


def test_finetune_loads_weights_only_and_no_load_optim_skips_adam(tmp_path):
    out = run_distributed(_load_body, 2, str(tmp_path))[0]  # data-parallel 2, ZeRO-1: sharded Adam state
    saved_moments = out["saved moments"]
    assert saved_moments > 0
    for name in ("finetune", "no-load-optim", "full"):
        assert out[name]["same_weights"], name
    assert (out["finetune"]["iteration"], out["finetune"]["samples"], out["finetune"]["moments"]) == (0, 0, 0)
    assert (out["no-load-optim"]["iteration"], out["no-load-optim"]["moments"]) == (3, 0)
    assert (out["full"]["iteration"], out["full"]["samples"], out["full"]["moments"]) == (3, 3 * GBS, saved_moments)


def test_defaults_that_differ_from_megatron_are_said_at_start_and_in_the_docs():
    """A Megatron script run unchanged gets our defaults where they differ (dropout 0.0, not 0.1):
    one start-up line names each one left unset; a flag given drops out of it; the docs do not call
    those flags "as in Megatron"."""
    from megatron_snm.config.flags import Flags
    import dataclasses

    table = {f.name: f.metadata["megatron_default"] for g in dataclasses.fields(Flags)
             for f in dataclasses.fields(g.default_factory) if "megatron_default" in f.metadata}
    # Megatron-LM's own values (megatron/core/transformer/transformer_config.py, training_config.py).
    assert table == {"hidden_dropout": 0.1, "attention_dropout": 0.1, "num_workers": 2, "lr_decay_style": "linear",
                     "eval_iters": 100}
    base = SHAPE + ["--train-iters", "1"]
    note = next(n for n in resolve(parse_args(base), 1).notes if n.startswith("defaults that differ"))
    for flag, ours, theirs in (("--hidden-dropout", "0.0", "0.1"), ("--attention-dropout", "0.0", "0.1"),
                               ("--lr-decay-style", "cosine", "linear"), ("--eval-iters", "10", "100"),
                               ("--num-workers", "0", "2")):
        assert f"{flag} {ours} (Megatron-LM: {theirs})" in note
    given = resolve(parse_args(base + ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr-decay-style",
                                       "linear", "--eval-iters", "100", "--num-workers", "2"]), 1).notes
    assert not any(n.startswith("defaults that differ") for n in given), given
    docs = (Path(__file__).resolve().parents[1] / "docs" / "megatron_flags.md").read_text()
    for name in table:
        for row in (line for line in docs.splitlines() if f"`--{name.replace('_', '-')}" in line):
            assert "as in Megatron" not in row, row


def test_fp16_on_cpu_suggests_bf16_before_anything_starts():
    from megatron_snm.training.trainer import build_run

    if torch.cuda.is_available():
        pytest.skip("a GPU trains in fp16")
    with pytest.raises(ConfigError, match=r"--fp16 .*needs a GPU.*use --bf16"):
        build_run(resolve(parse_args(SHAPE + ["--train-iters", "1", "--fp16"]), 1), 500)


def test_zero_takes_our_optimizer_without_the_untested_optimizer_warning():
    """DeepSpeed checks the optimizer's exact type against its list and warns on every ZeRO run
    otherwise (zero_allow_untested_optimizer only turns its assertion into that warning)."""
    from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS

    from megatron_snm.training.deepspeed_adapter import allow_under_zero
    from megatron_snm.training.optimizer import GatedAdamW

    allow_under_zero(GatedAdamW)
    assert GatedAdamW in ZERO_SUPPORTED_OPTIMIZERS  # what is_zero_supported_optimizer looks up, by exact type
    with pytest.raises(TypeError):
        allow_under_zero(torch.optim.SGD)
    ds = resolve(parse_args(SHAPE + ["--train-iters", "1", "--zero-stage", "1"]), 1).deepspeed
    assert "zero_allow_untested_optimizer" not in ds
