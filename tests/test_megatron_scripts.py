"""Megatron users' launch scripts run unchanged but for paths and sizes: the whole flag set of
Megatron-DeepSpeed's examples_deepspeed/rebase/ds_pretrain_gpt_{125M,1.3B,13B}.sh and of Megatron-LM's
examples/gpt3/train_gpt3_175b_distributed.sh, shapes and batches scaled down, trains 3 iterations on
CPU on the bundled C4 sample (GPT-2 BPE), and the effective configuration printed at start (Megatron's
"arguments" listing) shows every flag took effect.

CPU substitutions, only where a script asks for a GPU feature: --fp16 is dropped (and the DeepSpeed
JSON's fp16 section disabled) because DeepSpeed has no fp16 training on its CPU accelerator; the
flags' carrying of the fp16 loss-scaler settings into the DeepSpeed config is tested in
test_megatron_flags.py. Sizes: 4 ranks (TP 2 x PP 2, or TP 2 x DP 2 for the 1.3B script's
--no-pipeline-parallel), 4 layers, hidden 64, sequence 32, global batch 8; token and sample counts
scaled with the scripts' own ratios (--train-samples is twice --train-tokens' worth, as in the
scripts, so --train-tokens ends the run after 3 iterations).
One flag is removed: the 175B script's --step-batch-size-schedule (batch-size ramp-up), which
this system refuses with a message (docs/megatron_flags.md)."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_snm.config import build_parser
from megatron_snm.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[1]
SEQ, GBS, ITERS = 32, 8, 3
TOKENS = ITERS * GBS * SEQ  # --train-tokens: 3 iterations' worth


def ds_template(path: Path, zero_stage: int, prescale: bool) -> str:
    """Megatron-DeepSpeed's ds_config_gpt_TEMPLATE.json as its scripts fill it in (fp16 off: CPU)."""
    path.write_text(json.dumps({
        "train_batch_size": GBS, "train_micro_batch_size_per_gpu": 2, "steps_per_print": 1,
        "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 1.0, "prescale_gradients": prescale,
        "fp16": {"enabled": False, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
                 "initial_scale_power": 11},
        "wall_clock_breakdown": False}))
    return str(path)


def megatron_deepspeed(tmp: Path, data: str, gpt2: tuple, name: str, tp: int, pp: int, zero: int) -> list[str]:
    """The rebase scripts' data_options + megatron_options + deepspeed_options, in their order."""
    ckpt = str(tmp / name / "checkpoint")
    argv = ["--vocab-file", str(gpt2[0]), "--merge-file", str(gpt2[1]), "--data-path", data, "--data-impl", "mmap",
            "--override-opt_param-scheduler", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--tensor-model-parallel-size", str(tp), "--init-method-std", "0.02",
            "--lr-decay-tokens", str(TOKENS), "--lr-warmup-tokens", str(GBS * SEQ), "--micro-batch-size", "2",
            "--exit-duration-in-mins", "30000000", "--global-batch-size", str(GBS), "--num-layers", "4",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--train-tokens", str(TOKENS),
            "--train-samples", str(TOKENS * 2 // SEQ), "--lr", "6.0e-4", "--min-lr", "1.0e-6",
            "--lr-decay-style", "cosine", "--split", "949,50,1", "--log-interval", "1", "--eval-interval", "2",
            "--eval-iters", "1", "--save-interval", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--hysteresis", "2", "--num-workers", "0", "--seed", "1234", "--load", ckpt, "--save", ckpt,
            "--no-async-tensor-model-parallel-allreduce", "--tensorboard-queue-size", "1",
            "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
            "--tensorboard-dir", str(tmp / name / "tensorboard"), "--checkpoint-activations",
            "--log-optimizer-states-to-tensorboard",
            "--deepspeed", "--deepspeed_config", ds_template(tmp / f"{name}.json", zero, prescale=zero == 0),
            "--zero-stage", str(zero), "--pipeline-model-parallel-size", str(pp)]
    return argv + (["--no-pipeline-parallel"] if pp == 1 else []) + ["--deepspeed-activation-checkpointing"]


def megatron_lm_175b(tmp: Path, data: str, gpt2: tuple) -> list[str]:
    """train_gpt3_175b_distributed.sh's GPT_MODEL_ARGS, TRAINING_ARGS, MODEL_PARALLEL_ARGS, DATA_ARGS,
    EVAL_AND_LOGGING_ARGS (without --step-batch-size-schedule and, on CPU, --fp16)."""
    ckpt = str(tmp / "175b" / "checkpoint")
    return ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--attention-backend", "auto",
            "--micro-batch-size", "1", "--global-batch-size", str(GBS), "--train-iters", str(ITERS),
            "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--init-method-std", "0.006",
            "--clip-grad", "1.0", "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6",
            "--lr-warmup-fraction", ".001", "--lr-decay-iters", str(ITERS),
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--data-path", data, "--vocab-file", str(gpt2[0]), "--merge-file", str(gpt2[1]), "--split", "949,50,1",
            "--log-interval", "1", "--save-interval", "2", "--eval-interval", "2", "--save", ckpt, "--load", ckpt,
            "--eval-iters", "1", "--tensorboard-dir", str(tmp / "175b" / "tensorboard")]


def scripts(tmp: Path, data: str, gpt2: tuple) -> dict[str, list[str]]:
    return {"ds_pretrain_gpt_125M.sh": megatron_deepspeed(tmp, data, gpt2, "125M", tp=2, pp=2, zero=1),
            "ds_pretrain_gpt_1.3B.sh": megatron_deepspeed(tmp, data, gpt2, "1.3B", tp=2, pp=1, zero=0),
            "ds_pretrain_gpt_13B.sh": megatron_deepspeed(tmp, data, gpt2, "13B", tp=2, pp=2, zero=1),
            "train_gpt3_175b_distributed.sh": megatron_lm_175b(tmp, data, gpt2)}


def _body(rank, world_size, runs):
    """Each run as pretrain_gpt.py runs it: its printed output, TrainResult and vocabulary size."""
    import torch

    import pretrain_gpt
    from megatron_snm.parallel import state

    torch.set_num_threads(1)
    out = {}
    for name, argv in runs.items():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            run, tokenizer = pretrain_gpt.prepare(argv, world_size)
            result = pretrain_gpt.pretrain(run, tokenizer.vocab_size, eod=tokenizer.eod)
        state.destroy_model_parallel()
        out[name] = (printed.getvalue(), result, tokenizer.vocab_size)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_files, sample_dir):
    tmp = tmp_path_factory.mktemp("scripts")
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                    str(sample_dir / "c4-train.00000-of-00001.json.gz"), "--output-prefix", str(tmp / "c4"),
                    "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_files[0]), "--merge-file",
                    str(gpt2_files[1]), "--append-eod", "--workers", "1"], cwd=REPO, check=True, capture_output=True)
    argvs = scripts(tmp, str(tmp / "c4_text_document"), gpt2_files)
    return tmp, argvs, run_distributed(_body, 4, argvs, timeout=900)[0]


def arguments(printed: str) -> dict[str, str]:
    """Megatron's listing: '  name ........ value' lines between the two rulers."""
    block = printed.split("------------------------ arguments ------------------------\n")[1]
    block = block.split("\n-------------------- end of arguments ---------------------")[0]
    return {name: value for name, _, value in (line.strip().split(" ", 2) for line in block.splitlines())}


def given(argv: list[str]) -> dict[str, object]:
    """dest -> the value each flag was given (store_true flags: True, store_false: False; --flag=value as
    --flag value)."""
    actions = {option: action for action in build_parser()._actions for option in action.option_strings}
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]
    out, i = {}, 0
    while i < len(argv):
        action = actions[argv[i]]
        if action.nargs == 0:
            out[action.dest], i = action.const, i + 1
        elif action.nargs == "+":
            values = []
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            out[action.dest], i = values, i + 1 + len(values)
        else:
            out[action.dest], i = argv[i + 1], i + 2
    return out


def same(printed: str, value) -> bool:
    if isinstance(value, (bool, list)):
        return printed == str(value)
    try:
        return float(printed) == float(value)
    except ValueError:
        return printed == value


@pytest.mark.parametrize("script", ["ds_pretrain_gpt_125M.sh", "ds_pretrain_gpt_1.3B.sh", "ds_pretrain_gpt_13B.sh",
                                    "train_gpt3_175b_distributed.sh"])
def test_script_flag_set_runs_and_every_flag_takes_effect(runs, script):
    tmp, argvs, results = runs
    printed, result, _ = results[script]
    shown = arguments(printed)
    for dest, value in given(argvs[script]).items():
        assert same(shown[dest], value), (dest, shown[dest], value)
    assert result.iteration == ITERS and result.stopped is None and sorted(result.losses) == [1, 2, 3]
    assert all(0 < loss < 20 for loss in result.losses.values()), result.losses
    # What follows from the flags, as resolved.
    assert (shown["train_iters"], shown["tokenizer_type"], shown["world_size"]) == (str(ITERS), "GPT2BPETokenizer",
                                                                                   "4")
    if script.startswith("ds_"):  # Megatron-DeepSpeed: token schedule, --train-tokens ends the run
        assert (shown["lr_schedule_unit"], shown["lr_warmup_length"], shown["lr_decay_length"]) == \
            ("tokens", str(GBS * SEQ), str(TOKENS))
        assert (shown["recompute_granularity"], shown["recompute_method"], shown["recompute_num_layers"]) == \
            ("full", "uniform", "1")
        assert "'hysteresis': 2" in shown["deepspeed_fp16"] and "'loss_scale_window': 500" in shown["deepspeed_fp16"]
        for flag in ("--data-impl mmap", "--no-async-tensor-model-parallel-allreduce", "--tensorboard-queue-size 1"):
            assert f" {flag} has no effect" in printed, flag
        tensorboard = tmp / script.split("_")[-1].removesuffix(".sh") / "tensorboard"
        assert list(tensorboard.glob("events.out.tfevents.*")), tensorboard
        latest = (tmp / script.split("_")[-1].removesuffix(".sh") / "checkpoint" / "latest").read_text()
        assert latest == f"iter_{ITERS:07d}"
    else:  # Megatron-LM: iterations, warm-up as a fraction of the decay
        assert (shown["lr_schedule_unit"], shown["lr_warmup_length"], shown["lr_decay_length"]) == \
            ("samples", str(round(0.001 * ITERS * GBS)), str(ITERS * GBS))
        assert shown["data_parallel_size"] == "1" and shown["gradient_accumulation_steps"] == str(GBS)
    if script == "ds_pretrain_gpt_1.3B.sh":
        assert shown["data_parallel_size"] == "2" and " --no-pipeline-parallel has no effect" in printed
