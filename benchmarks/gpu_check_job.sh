#!/usr/bin/env bash
# Step 6 of benchmarks/gpu_check.sh: the real training job on one device for a few steps, under
# torchrun (NCCL on a GPU, gloo on CPU) through DeepSpeed, on the bundled C4-format sample.
#   bash benchmarks/gpu_check_job.sh WORK_DIR MICRO_BATCH STEPS MODEL_AND_PRECISION_FLAGS...
# Tokenizer: benchmarks/sample_dataset.sh's (GPT-2's files where found, else SentencePiece on the sample).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
PYTHON="${PYTHON:-python}"
work=$1 micro=$2 steps=$3
shift 3
mkdir -p "$work"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
source benchmarks/sample_dataset.sh

tokenize_sample "$work"

# 85,10,5 leaves the 21-document sample 2 validation documents (and 1 test): the run validates on
# documents it never trained on (98,1,1 left validation none, which a run asking for --eval-iters refuses).
torchrun --nproc-per-node 1 --master-port "${MASTER_PORT:-29531}" pretrain_gpt.py "$@" \
    --init-method small --embedding-norm layernorm --zero-stage 0 \
    --micro-batch-size "$micro" --global-batch-size "$micro" --train-iters "$steps" \
    --lr 5e-4 --min-lr 5e-5 --lr-warmup-iters $((steps / 5)) --lr-decay-style cosine --clip-grad 1.0 \
    --data-path "$work/sample_text_document" --split 85,10,5 --data-cache-path "$work/index-cache" \
    "${tokenizer[@]}" --log-interval $((steps >= 10 ? 5 : 1)) --eval-interval "$steps" --eval-iters 1 \
    2>&1 | tee "$work/pretrain_gpt.log"
# A run that exits 0 yet never reached its last iteration or its validation is a failed check.
grep -q "iteration *$steps/ *$steps " "$work/pretrain_gpt.log" || { echo "gpu_check_job: no log line of iteration $steps"; exit 1; }
grep -q "validation loss" "$work/pretrain_gpt.log" || { echo "gpu_check_job: no validation loss line"; exit 1; }
