"""Flags: Megatron names, presets, the DeepSpeed JSON merge, and every bad combination refused by
`pretrain_gpt.py` before any process group starts (exit status 2, the flag named)."""
import json

import pytest
import torch.distributed as dist

import pretrain_gpt
from megatron_snm.config import ConfigError, build_parser, parse_args, resolve

SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--train-iters", "10"]


def refused(argv, world_size, monkeypatch, capsys) -> str:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    assert pretrain_gpt.main(argv) == 2
    assert not dist.is_initialized()
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, world, message", [
    (SHAPE + ["--hidden-size", "66"], 1, "--hidden-size (66) must be divisible by --num-attention-heads (4)"),
    (SHAPE + ["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads (4) must be divisible by "
                                                        "--tensor-model-parallel-size (8)"),
    (SHAPE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     "world size 6 is not divisible by --tensor-model-parallel-size (2) x --pipeline-model-parallel-size (2)"),
    (SHAPE + ["--pipeline-model-parallel-size", "2", "--zero-stage", "3"], 2,
     "ZeRO stage 3 (--zero-stage or the DeepSpeed JSON) cannot be combined with --pipeline-model-parallel-size 2"),
    (SHAPE + ["--pipeline-model-parallel-size", "4"], 4, "--pipeline-model-parallel-size (4) must not exceed "
                                                         "--num-layers (2)"),
    (SHAPE + ["--fp16", "--bf16"], 1, "--fp16 and --bf16 are mutually exclusive"),
    (SHAPE + ["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
     "--global-batch-size (6) must be divisible by --micro-batch-size (2) x data-parallel size (2"),
    (SHAPE + ["--train-samples", "1000"], 1, "give one of --train-iters and --train-samples, not both"),
    (SHAPE + ["--save-interval", "5"], 1, "--save-interval needs --save"),
    (SHAPE[:-2], 1, "give one of --train-iters, --train-samples and --train-tokens"),
    (SHAPE[2:], 1, "--num-layers is required (or give --model-size)"),
    (SHAPE + ["--lr", "inf"], 1, "--lr must be a finite number, got inf"),
    (SHAPE + ["--lr", "nan"], 1, "--lr must be a finite number, got nan"),
    (SHAPE + ["--clip-grad", "-1"], 1, "--clip-grad must be >= 0"),
    (SHAPE + ["--eval-iters", "-1"], 1, "--eval-iters must be >= 0"),
    (SHAPE + ["--adam-beta2", "1.5"], 1, "--adam-beta2 must be in [0, 1)"),
    (SHAPE + ["--split", "100,0,0"], 1, "--split 100,0,0 gives the validation set no documents"),
    (SHAPE + ["--split", "90,x,10"], 1, "--split '90,x,10': expected up to three numbers"),
    (SHAPE + ["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes must be > 0, got 0.0"),
])
def test_bad_combinations_refused_before_any_process_group(argv, world, message, monkeypatch, capsys):
    assert message in refused(argv, world, monkeypatch, capsys)


def test_missing_data_and_tokenizer_refused(tmp_path, monkeypatch, capsys):
    err = refused(SHAPE + ["--data-path", str(tmp_path / "nothing")], 1, monkeypatch, capsys)
    assert f"--data-path: {tmp_path / 'nothing'}.bin does not exist" in err
    for suffix in (".bin", ".idx"):
        (tmp_path / f"c4{suffix}").write_bytes(b"")
    err = refused(SHAPE + ["--data-path", str(tmp_path / "c4")], 1, monkeypatch, capsys)
    assert "--tokenizer-type is required" in err
    err = refused(SHAPE + ["--data-path", str(tmp_path / "c4"), "--tokenizer-type", "SentencePieceTokenizer",
                           "--tokenizer-model", str(tmp_path / "missing.model")], 1, monkeypatch, capsys)
    assert "missing.model" in err


def write_json(tmp_path, config) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("json_config, flags, message", [
    ({"zero_optimization": {"stage": 2}}, ["--zero-stage", "1"], "--zero-stage 1 conflicts with"),
    ({"train_micro_batch_size_per_gpu": 4}, ["--micro-batch-size", "2"], "--micro-batch-size 2 conflicts with"),
    ({"train_batch_size": 32}, ["--global-batch-size", "16"], "--global-batch-size 16 conflicts with"),
    ({"gradient_clipping": 0.5}, ["--clip-grad", "1.0"], "--clip-grad 1.0 conflicts with"),
    ({"bf16": {"enabled": False}}, ["--bf16"], "--bf16 True conflicts with"),
    ({"fp16": {"enabled": True}}, ["--bf16"], "--fp16 and --bf16 are mutually exclusive"),
    ({"optimizer": {"type": "Adam"}}, [], "remove the 'optimizer' section"),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, [],
     "gradient_accumulation_steps 3 disagrees with --global-batch-size 16"),
])
def test_deepspeed_json_conflicts_refused(json_config, flags, message, tmp_path, monkeypatch, capsys):
    argv = SHAPE + ["--micro-batch-size", "2"] * ("--micro-batch-size" not in flags) + flags + \
        ["--deepspeed", "--deepspeed_config", write_json(tmp_path, json_config)]
    err = refused(argv, 2, monkeypatch, capsys)
    assert message in err and "ds.json" in err


def test_deepspeed_json_fills_what_flags_leave_open(tmp_path):
    path = write_json(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True},
                                 "train_batch_size": 32, "gradient_clipping": 0.3, "wall_clock_breakdown": True})
    run = resolve(parse_args(SHAPE + ["--micro-batch-size", "4", "--deepspeed_config", path]), world_size=4)
    p = run.parallel
    assert (p.zero_stage, p.bf16, p.fp16, run.batch.global_batch_size, run.optim.clip_grad) == (2, True, False, 32, 0.3)
    ds = run.deepspeed
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["wall_clock_breakdown"] is True  # the JSON's own keys are kept


def test_generated_deepspeed_config_from_flags():
    flags = parse_args(SHAPE + ["--micro-batch-size", "2", "--global-batch-size", "16", "--zero-stage", "3",
                                "--fp16", "--loss-scale", "128", "--tensor-model-parallel-size", "2"])
    ds = resolve(flags, world_size=4).deepspeed  # DP = 2 -> 4 micro-batches per step
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"] == {"stage": 3}
    assert ds["fp16"] == {"enabled": True, "loss_scale": 128.0, "initial_scale_power": 32, "min_loss_scale": 1.0,
                          "loss_scale_window": 1000, "hysteresis": 2} and ds["bf16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 1.0


def test_defaults_presets_and_train_tokens():
    flags = parse_args(["--model-size", "1.7b", "--num-layers", "4", "--train-tokens", "1000000",
                        "--global-batch-size", "8", "--local_rank=1"])
    run = resolve(flags, world_size=1)
    m = run.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length) == (4, 2304, 24, 2048)
    assert run.batch.train_iters == 62  # ceil(1e6 / (8 x 2048))
    assert run.optim.lr_decay_iters == 62 and run.parallel.zero_stage == 0 and run.optim.clip_grad == 1.0
    assert flags.model.hidden_size is None and flags.batch.train_iters is None  # resolve changed nothing given
    gpt = run.model_config(vocab_size=50257)
    assert gpt.scaled_init and gpt.embedding_norm == "layernorm" and gpt.ffn_hidden_size == 4 * 2304


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--zero-stage", "--deepspeed_config",
                 "--micro-batch-size", "--global-batch-size", "--lr-decay-style", "--adam-beta2", "--clip-grad",
                 "--train-tokens", "--eval-iters", "--tensorboard-dir", "--log-stability-interval", "--save-interval",
                 "--spike-factor", "--skip-spiky-steps", "--max-skipped-steps", "--embedding-norm", "--no-scaled-init",
                 "--no-weight-decay-embeddings", "--data-path", "--tokenizer-model", "--bf16"):
        assert flag in text, flag


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        resolve(parse_args(SHAPE + ["--lr", "1e-3", "--min-lr", "1e-2"]), 1)


def test_distributed_timeout_is_megatrons():
    """Megatron's default of 10 minutes; a fraction of a minute is accepted (tests stop a rank for
    seconds: tests/test_launch.py checks a stopped rank ends the run after it)."""
    assert parse_args(SHAPE).parallel.distributed_timeout_minutes == 10
    assert parse_args(SHAPE + ["--distributed-timeout-minutes", "0.05"]).parallel.distributed_timeout_minutes == 0.05
