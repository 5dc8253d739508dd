"""Megatron's Llama launch scripts run unchanged but for paths and sizes, as the GPT-2 scripts do in
test_megatron_scripts.py: the whole flag set of Megatron-LM's examples/llama/train_llama3_8b_h100_fp8.sh
(its --mock-data branch, on 4 ranks: TP 2 with --sequence-parallel x DP 2) and of Megatron-DeepSpeed's
examples_deepspeed/pretrain_llama2_distributed.sh (its DeepSpeed JSON: TP 2 x PP 2, ZeRO 0, bf16, a
SentencePiece model through GPTSentencePieceTokenizer) trains 3 iterations on CPU, and the printed
arguments listing shows every flag took effect (or the start-up note says what it does here).

Sizes: 4 layers, hidden 64, 4 heads (2 key/value groups), sequence 32, global batch 8, 3 iterations; the
FFN, the vocabulary and the sample counts scaled with the scripts' own ratios; --profile-step-start/-end
moved inside the 3 iterations. CPU substitutions, only where a script asks for a GPU: the Llama-3
script's DTYPE is fp8 by default, whose --fp8-* flags are refused naming --bf16 (tested below): the run
takes the script's other branch, --bf16 alone; Megatron-DeepSpeed's --distributed-backend nccl becomes
gloo (nccl on a CPU machine is refused naming gloo, test_megatron_flags.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_snm.config import ConfigError, parse_args, resolve
from megatron_snm.parallel.spawn import run_distributed
from tests.test_megatron_scripts import _body, arguments, given, same

REPO = Path(__file__).resolve().parents[1]
SEQ, GBS, ITERS = 32, 8, 3
NULL_VOCAB = 1000  # --vocab-size: NullTokenizer's ids before the end of document


def llama3_8b(tmp: Path, dtype: str = "bf16") -> list[str]:
    """train_llama3_8b_h100_fp8.sh's MODEL_ARGS, TRAINING_ARGS, DTYPE_ARGS, MODEL_PARALLEL_ARGS,
    DATA_ARGS_LIST (MOCK) and EVAL_AND_LOGGING_ARGS, in its order."""
    run = tmp / "llama3"
    model = ["--use-mcore-models", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "224",
             "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "16",
             "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--swiglu", "--normalization", "RMSNorm", "--init-method-std", "0.0134",
             "--attention-backend", "fused", "--apply-layernorm-1p", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear"]
    training = ["--micro-batch-size", "1", "--global-batch-size", str(GBS), "--train-samples", str(ITERS * GBS),
                "--lr-decay-samples", str((ITERS - 1) * GBS), "--lr-warmup-samples", str(GBS), "--lr", "0.00015",
                "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5",
                "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
                "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
                "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
                "--exit-duration-in-mins", "235"]
    fp8 = ["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024", "--fp8-amax-compute-algo", "max",
           "--fp8-param-gather"] if dtype == "fp8" else []
    parallel = ["--tensor-model-parallel-size", "2", "--context-parallel-size", "1", "--sequence-parallel"]
    ddp = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    # "--split '99,1,0'" reaches Megatron with its quotes: the script expands the array unquoted.
    data = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(NULL_VOCAB),
            "--data-cache-path", str(run / "cache"), "--tiktoken-pattern", "v2", "--split", "'99,1,0'",
            "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--num-workers", "1"]
    logging = ["--log-interval", "1", "--eval-iters", "1", "--eval-interval", "2", "--save-interval", "2",
               "--log-throughput", "--profile", "--profile-step-start", "1", "--profile-step-end", "2",
               "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "60", "--save", str(run / "checkpoint"), "--load", str(run / "checkpoint"),
               "--tensorboard-dir", str(run / "tensorboard")]
    return model + training + ddp + fp8 + parallel + data + logging


def llama2_deepspeed(tmp: Path, data: str, sp_model: str) -> list[str]:
    """pretrain_llama2_distributed.sh's torchrun arguments (activation_checkpoint=false, no wandb) and
    its ds_args, with the DeepSpeed JSON it writes."""
    run = tmp / "llama2"
    run.mkdir(exist_ok=True)
    ds_config = run / "deepspeed.json"
    ds_config.write_text(json.dumps({"train_batch_size": GBS, "train_micro_batch_size_per_gpu": 2,
                                     "steps_per_print": 1, "zero_optimization": {"stage": 0},
                                     "bf16": {"enabled": True}}))
    ckpt = str(run / "checkpoint")
    return ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--num-layers", "4",
            "--hidden-size", "64", "--ffn-hidden-size", "172", "--num-attention-heads", "4", "--micro-batch-size",
            "2", "--global-batch-size", str(GBS), "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
            "--train-iters", str(ITERS), "--save", ckpt, "--load", ckpt, "--data-path", "1", data,
            "--data-impl", "mmap", "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--split", "949,50,1", "--distributed-backend", "gloo", "--lr", "3e-4", "--lr-decay-style", "cosine",
            "--min-lr", "3e-5", "--weight-decay", "0.1", "--clip-grad", "1", "--lr-warmup-iters", "1",
            "--optimizer", "adam", "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--log-interval", "1",
            "--save-interval", "2", "--eval-interval", "2", "--eval-iters", "1", "--bf16",
            "--no-query-key-layer-scaling", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--swiglu",
            "--normalization", "rmsnorm", "--disable-bias-linear", "--num-key-value-heads", "2",
            "--zero-stage=0", f"--deepspeed_config={ds_config}", "--deepspeed"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_dir):
    tmp = tmp_path_factory.mktemp("llama_scripts")
    subprocess.run([sys.executable, "tools/train_tokenizer.py", "--input", str(sample_dir), "--model-prefix",
                    str(tmp / "sp"), "--vocab-size", "500", "--workers", "1"], cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                    str(sample_dir / "c4-train.00000-of-00001.json.gz"), "--output-prefix", str(tmp / "c4"),
                    "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(tmp / "sp.model"),
                    "--append-eod", "--workers", "1"], cwd=REPO, check=True, capture_output=True, timeout=300)
    argvs = {"train_llama3_8b_h100_fp8.sh": llama3_8b(tmp),
             "pretrain_llama2_distributed.sh": llama2_deepspeed(tmp, str(tmp / "c4_text_document"),
                                                                str(tmp / "sp.model"))}
    return tmp, argvs, run_distributed(_body, 4, argvs, timeout=900)[0]


# Flags whose effect is another field of the listing (Megatron-DeepSpeed's aliases, folded into
# Megatron-LM's spelling) or a fallback with a note: dest -> what the listing shows instead.
FOLDED = {"use_rotary_position_embeddings": ("position_embedding_type", "rope"),
          "normalization": ("normalization", "RMSNorm"),
          "num_key_value_heads": ("num_query_groups", "2"),
          "attention_backend": ("attention_backend", "auto")}


@pytest.mark.parametrize("script", ["train_llama3_8b_h100_fp8.sh", "pretrain_llama2_distributed.sh"])
def test_llama_script_flag_set_runs_and_every_flag_takes_effect(runs, script):
    tmp, argvs, results = runs
    printed, result, vocab_size = results[script]
    shown = arguments(printed)
    for dest, value in given(argvs[script]).items():
        if dest in FOLDED:
            dest, value = FOLDED[dest]
        assert same(shown[dest], value), (dest, shown[dest], value)
    assert result.iteration == ITERS and result.stopped is None and sorted(result.losses) == [1, 2, 3]
    assert all(0 < loss < 20 for loss in result.losses.values()), result.losses
    assert sorted(result.valid_losses) == [2]
    # The Llama architecture, as resolved.
    assert (shown["group_query_attention"], shown["swiglu"], shown["add_bias_linear"],
            shown["untie_embeddings_and_output_weights"]) == ("True", "True", "False", "True")
    assert (shown["train_iters"], shown["world_size"], shown["bf16"]) == (str(ITERS), "4", "True")
    run_dir = tmp / ("llama3" if script.startswith("train_") else "llama2")
    assert (run_dir / "checkpoint" / "latest").read_text() == f"iter_{ITERS:07d}"
    if script == "train_llama3_8b_h100_fp8.sh":
        assert (shown["tensor_model_parallel_size"], shown["sequence_parallel"], shown["data_parallel_size"],
                shown["deepspeed_zero_stage"]) == ("2", "True", "2", "1")
        assert vocab_size == NULL_VOCAB + 1  # NullTokenizer: the ids and the end of document
        assert (shown["lr_schedule_unit"], shown["lr_warmup_length"], shown["lr_decay_length"]) == \
            ("samples", str(GBS), str((ITERS - 1) * GBS))
        for flag in ("--use-mcore-models", "--overlap-grad-reduce", "--overlap-param-gather", "--grad-reduce-in-bf16",
                     "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--tiktoken-pattern v2",
                     "--no-create-attention-mask-in-dataloader", "--no-mmap-bin-files", "--ckpt-format torch_dist",
                     "--attention-backend fused"):
            assert f" {flag} has no effect" in printed, flag
        if not torch.cuda.is_available():
            assert " --empty-unused-memory-level 1 has no effect" in printed
        # --profile: rank 0's trace of step 2 (after step 1, up to step 2); --tensorboard-dir: the scalars.
        tensorboard = run_dir / "tensorboard"
        assert len(list(tensorboard.glob("rank0.*.pt.trace.json"))) == 1
        assert list(tensorboard.glob("events.out.tfevents.*"))
        assert "throughput per GPU (TFLOP/s/GPU)" in printed  # --log-throughput
        assert list((run_dir / "cache").glob("mock-train-*-description.json"))  # --data-cache-path
    else:
        assert (shown["pipeline_model_parallel_size"], shown["deepspeed_zero_stage"], shown["data_parallel_size"],
                shown["tokenizer_type"]) == ("2", "0", "1", "GPTSentencePieceTokenizer")
        assert vocab_size == 500
        for flag in ("--data-impl mmap", "--no-query-key-layer-scaling", "--distributed-backend gloo"):
            assert f" {flag} has no effect" in printed, flag


def test_llama3_script_fp8_branch_is_refused_naming_bf16(tmp_path):
    """The script's default DTYPE=fp8 adds --fp8-format hybrid and three more --fp8-* flags: refused
    before anything starts, saying to use --bf16."""
    with pytest.raises(ConfigError, match=r"--fp8-format is not supported: .*use --bf16"):
        resolve(parse_args(llama3_8b(tmp_path, dtype="fp8")), 4)
    with pytest.raises(ConfigError, match=r"--fp8-param-gather is not supported: .*use --bf16"):
        resolve(parse_args(llama3_8b(tmp_path) + ["--fp8-param-gather"]), 4)


def test_context_parallelism_is_refused_beyond_one(tmp_path):
    argv = llama3_8b(tmp_path)
    resolve(parse_args(argv), 4)  # --context-parallel-size 1: accepted
    argv[argv.index("--context-parallel-size") + 1] = "2"
    with pytest.raises(ConfigError, match=r"--context-parallel-size is not supported: .*--sequence-parallel"):
        resolve(parse_args(argv), 4)
