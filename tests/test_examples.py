"""The launch examples: every script is valid bash, and the command each one would run is accepted by
the real argument parser, its validation for the script's world size, and DeepSpeed's own config
parser. Nothing is launched: DRY_RUN=1 makes examples/launch.sh print the command instead."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

from megatron_snm.config import ConfigError, parse_args, resolve

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SIZES = {"350m": (24, 1024), "1.7b": (24, 2304), "13b": (40, 5120)}  # layers, hidden
# Variables the scripts read; cleared so the caller's environment cannot change what is tested.
SCRIPT_VARS = ("NNODES", "GPUS_PER_NODE", "HOSTFILE", "TP", "PP", "ZERO", "MICRO_BATCH", "GLOBAL_BATCH", "LR",
               "MIN_LR", "TRAIN_ITERS", "WARMUP_ITERS", "EMBEDDING_NORM", "DATA_PREFIX", "VOCAB", "MERGES",
               "RUN_DIR", "DS_CONFIG", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "MODEL_SIZE",
               "EXTRA_ARGS", "ADAM_BETA2", "WEIGHT_DECAY", "REPO")


def dry_run(script: str, **env) -> tuple[int, list[str], list[str]]:
    """(world size, launcher words, pretrain_gpt.py arguments) of the command `script` would run."""
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(EXAMPLES / script)], env={**clean, "DRY_RUN": "1", **env},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    header, command = out.stdout.strip().splitlines()
    world = int(re.fullmatch(r"# world size (\d+) \(.*\)", header).group(1))
    words = shlex.split(command)
    cut = words.index("pretrain_gpt.py") + 1
    return world, words[:cut], words[cut:]


def accepted(argv: list[str], world: int, monkeypatch):
    """Parses and resolves like pretrain_gpt.py, then hands the merged DeepSpeed config to DeepSpeed's
    own parser as rank 0 of the run's data-parallel world. Returns the resolved flags (flat, as
    Megatron's `args`) and DeepSpeed's view."""
    import deepspeed.runtime.config as ds_config_module

    run = resolve(parse_args(argv), world)
    dp = run.dims.data

    class DataParallelOnly:
        @staticmethod
        def get_data_parallel_world_size():
            return dp

    monkeypatch.setattr(ds_config_module.dist, "get_rank", lambda *a, **k: 0)  # no process group here
    ds = ds_config_module.DeepSpeedConfig(run.deepspeed, mpu=DataParallelOnly())
    assert ds.world_size == dp
    assert ds.train_batch_size == run.batch.global_batch_size
    return SimpleNamespace(**run.as_dict(), data_parallel_size=dp), ds


SCRIPTS = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_valid_bash(script):
    out = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("size", sorted(SIZES))
def test_paper_example_is_accepted_for_its_world_size(size, monkeypatch):
    world, launcher, argv = dry_run(f"pretrain_gpt_{size}.sh", HOSTFILE=str(EXAMPLES / "hostfile.example"))
    assert launcher[0] == "deepspeed"
    assert launcher[launcher.index("--num_nodes") + 1] == str(world // 8)
    cfg, ds = accepted(argv, world, monkeypatch)
    # The paper's settings.
    assert (cfg.num_layers, cfg.hidden_size) == SIZES[size]
    assert (cfg.seq_length, cfg.global_batch_size, cfg.lr) == (2048, 528, 5e-4)
    assert (cfg.init_method, cfg.scaled_init, cfg.embedding_norm) == ("small", True, "layernorm")
    assert cfg.bf16 and ds.bfloat16_config.enabled
    assert cfg.lr_decay_style == "cosine" and cfg.lr_warmup_iters > 0
    assert cfg.tokenizer_type == "GPT2BPETokenizer"
    assert cfg.micro_batch_size * cfg.data_parallel_size * ds.gradient_accumulation_steps == 528
    assert ds.zero_optimization_stage == cfg.zero_stage == json.loads(Path(cfg.deepspeed_config).read_text())[
        "zero_optimization"]["stage"]


def test_llama_example_is_accepted_for_its_world_size(monkeypatch):
    """The Llama-family example: the paper's recipe on Llama 3.2 1B's architecture, 8 ranks."""
    world, launcher, argv = dry_run("pretrain_llama_1b.sh")
    assert world == 8 and launcher[0] == "deepspeed"
    cfg, ds = accepted(argv, world, monkeypatch)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (16, 2048, 32, 8)
    assert (cfg.position_embedding_type, cfg.rotary_base, cfg.normalization) == ("rope", 500000, "RMSNorm")
    assert cfg.swiglu and cfg.ffn_hidden_size == 8192 and not cfg.add_bias_linear and cfg.sequence_parallel
    assert (cfg.init_method, cfg.scaled_init, cfg.embedding_norm) == ("small", True, "layernorm")
    assert cfg.micro_batch_size * cfg.data_parallel_size * ds.gradient_accumulation_steps == 528


def test_overrides_reach_the_flags(monkeypatch):
    world, _, argv = dry_run("pretrain_gpt_1.7b.sh", LR="1e-3", EMBEDDING_NORM="scaled", ZERO="3", TP="1",
                             NNODES="2", HOSTFILE="hosts", DATA_PREFIX="/data/c4_text_document")
    assert world == 16
    cfg, ds = accepted(argv, world, monkeypatch)
    assert (cfg.lr, cfg.embedding_norm, cfg.tensor_model_parallel_size) == (1e-3, "scaled", 1)
    assert cfg.data_path == ["/data/c4_text_document"]
    assert ds.zero_optimization_stage == 3 and Path(cfg.deepspeed_config).name == "ds_zero3.json"
    # DP=16: the micro-batch drops from 4 to the largest that still splits 528 (3 x 16 x 11).
    assert (cfg.micro_batch_size, ds.gradient_accumulation_steps) == (3, 11)


def test_a_global_batch_that_cannot_be_split_is_refused():
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_gpt_350m.sh")], env={**os.environ, "DRY_RUN": "1",
                         "NNODES": "4", "HOSTFILE": "hosts"}, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "cannot be split over DP=32" in out.stderr


def test_a_bad_override_is_refused_before_launch(monkeypatch):
    # ZeRO-2 cannot go with the 13B example's pipeline parallelism; validation says so.
    world, _, argv = dry_run("pretrain_gpt_13b.sh", ZERO="2", HOSTFILE="hosts")
    with pytest.raises(ConfigError, match="ZeRO stage 2"):
        accepted(argv, world, monkeypatch)


def test_multi_node_without_hostfile_is_refused():
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_gpt_13b.sh")], env={**os.environ, "DRY_RUN": "1",
                         "NNODES": "4", "HOSTFILE": ""}, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "HOSTFILE" in out.stderr


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_is_accepted(stage, monkeypatch):
    path = EXAMPLES / f"ds_zero{stage}.json"
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == stage and raw["bf16"]["enabled"] is True
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "2", "--global-batch-size", "32", "--train-iters", "10", "--bf16",
             "--deepspeed", "--deepspeed_config", str(path)]
    cfg, ds = accepted([*flags, "--zero-stage", str(stage)], 8, monkeypatch)
    assert ds.zero_optimization_stage == stage and ds.bfloat16_config.enabled
    assert ds.gradient_accumulation_steps == 2
    # A stage that contradicts the JSON is a configuration error, not a silent choice.
    with pytest.raises(ConfigError, match="conflicts"):
        resolve(parse_args([*flags, "--zero-stage", str(stage % 3 + 1)]), 8)


def test_mpirun_variant(monkeypatch):
    world, launcher, argv = dry_run("pretrain_gpt_mpirun.sh", MODEL_SIZE="350m", NNODES="2", MICRO_BATCH="1",
                                    HOSTFILE="hosts", MASTER_ADDR="node-01")
    assert world == 16 and launcher[0] == "mpirun"
    assert launcher[launcher.index("-np") + 1] == "16" and "--hostfile" in launcher
    assert "MASTER_ADDR=node-01" in launcher
    cfg, _ = accepted(argv, world, monkeypatch)
    assert cfg.num_layers == 24 and cfg.hidden_size == 1024


def test_slurm_batch_script(tmp_path, monkeypatch):
    # srun starts every rank itself (no launcher in between: SLURM's USR1 reaches the ranks, their
    # exit status 4 reaches the requeue), each task's SLURM ids becoming its rank variables.
    world, launcher, argv = dry_run(
        "pretrain_gpt_slurm.sbatch", SLURM_SUBMIT_DIR=str(REPO), SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
        MASTER_ADDR="node-01", MODEL_SIZE="1.7b")
    assert world == 16 and launcher[0] == "srun"
    for flag, value in (("--nodes", "2"), ("--ntasks-per-node", "8")):
        assert launcher[launcher.index(flag) + 1] == value
    wrapper = launcher[launcher.index("-c") + 1]
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in wrapper
    ranks = subprocess.run(["bash", "-c", wrapper, "rank", "bash", "-c", "echo $RANK/$WORLD_SIZE/$LOCAL_RANK"],
                           env=dict(os.environ, SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1"),
                           capture_output=True, text=True)
    assert ranks.stdout.strip() == "9/16/1"
    assert "--exit-signal-handler" in argv
    accepted(argv, world, monkeypatch)


# --- A newcomer pokes at the examples: --help, DRY_RUN, the README's recipe --------------------------

LAUNCH_EXAMPLES = [s for s in SCRIPTS if s.startswith("pretrain_")]
LAUNCH_COMMANDS = ("deepspeed", "torchrun", "mpirun", "srun", "python", "sbatch", "scontrol")


def recording_path(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose launchers (and python) only record that they were called, in `calls`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name in LAUNCH_COMMANDS:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n')
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    return {**clean, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
            "DEEPSPEED": str(bin_dir / "deepspeed"), "HOSTFILE": str(EXAMPLES / "hostfile.example")}, calls


@pytest.mark.parametrize("script", LAUNCH_EXAMPLES)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_launches_nothing(script, flag, tmp_path):
    env, calls = recording_path(tmp_path)
    out = subprocess.run(["bash", str(EXAMPLES / script), flag], env={**env, "OUT": str(tmp_path / "out")},
                         capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not calls.exists(), calls.read_text()
    assert not (tmp_path / "out").exists()
    # What it launches and its variables.
    assert re.search(r"deepspeed|srun|mpirun", out.stdout), out.stdout
    for variable in (("OUT", "TRAIN_ITERS", "DRY_RUN") if "tiny" in script else ("LR", "EMBEDDING_NORM", "DRY_RUN", "NNODES")):
        assert variable in out.stdout, (variable, out.stdout)


@pytest.mark.parametrize("script", LAUNCH_EXAMPLES)
def test_an_argument_is_refused_and_launches_nothing(script, tmp_path):
    env, calls = recording_path(tmp_path)
    out = subprocess.run(["bash", str(EXAMPLES / script), "--train-iters", "10"], env=env, capture_output=True,
                         text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2 and "takes no arguments" in out.stderr and "--help" in out.stderr, out.stderr
    assert not calls.exists(), calls.read_text()


def test_tiny_cpu_dry_run_deletes_and_launches_nothing(tmp_path):
    env, calls = recording_path(tmp_path)
    out_dir = tmp_path / "run"
    for kept in ("checkpoints/latest", "tensorboard/events", "tokenizer.model"):
        (out_dir / kept).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / kept).write_text("the user's")
    out = subprocess.run(["bash", str(EXAMPLES / "pretrain_gpt_tiny_cpu.sh")],
                         env={**env, "DRY_RUN": "1", "OUT": str(out_dir)}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert not calls.exists(), calls.read_text()
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()) == [
        "checkpoints/latest", "tensorboard/events", "tokenizer.model"]
    command = shlex.split(out.stdout.strip().splitlines()[-1])
    assert command[:3] == [env["DEEPSPEED"], "--num_gpus", "2"]
    assert resolve(parse_args(command[command.index("pretrain_gpt.py") + 1:]), 2).as_dict()["split"] == "85,10,5"
    # Without DRY_RUN the same script launches (here: the recording deepspeed) after its fresh start.
    subprocess.run(["bash", str(EXAMPLES / "pretrain_gpt_tiny_cpu.sh")], env={**env, "OUT": str(out_dir)},
                   capture_output=True, text=True, timeout=30)
    assert "deepspeed --num_gpus 2 pretrain_gpt.py" in calls.read_text()


def test_will_it_fit_recipe_works_by_copy_and_paste(tmp_path):
    """The "will it fit?" block of examples/README.md, run as written (python = this interpreter)."""
    readme = (EXAMPLES / "README.md").read_text()
    section = readme[readme.index("## Memory: will it fit?"):]
    recipe = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARS and not k.startswith("SLURM_")}
    out = subprocess.run(["bash", "-c", recipe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**clean, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fits"] is True and 10 * 2**30 < result["per_rank_bytes"] < 30 * 2**30
