#!/usr/bin/env bash
# The paper's smallest size from "Spike No More" (Takase et al., arXiv 2312.16903): a 350M GPT
# (GPT-3 Medium: 24 layers, hidden 1024, 16 heads, sequence 2048) pre-trained on C4 (GPT-2 BPE)
# with Adam, global batch 528, bf16, scaled initialisation (sigma = sqrt(2/(5d)), W_O and W_2 by
# 1/sqrt(2N)) plus Embed LN: the paper's stable recipe. LR=5e-4 is the paper's usual rate, LR=1e-3
# the large one. EMBEDDING_NORM=none gives the vanilla baseline, =scaled Scaled Embed, =detach
# Embed Detach.
# Adam's beta2, weight decay, clipping, warm-up and the training length are not the paper's
# figures but GPT-3's / Megatron-LM's (override them below).
#
# One node of 8 GPUs: the model fits on each GPU, so pure data parallelism (DP=8), ZeRO-1.
#   bash examples/pretrain_gpt_350m.sh
#   LR=1e-3 EMBEDDING_NORM=scaled bash examples/pretrain_gpt_350m.sh
#   NNODES=2 HOSTFILE=examples/hostfile.example bash examples/pretrain_gpt_350m.sh   # DP=16, micro-batch 1
# Data: see examples/README.md (tools/preprocess_data.py over C4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-1}"
PP="${PP:-1}"
ZERO="${ZERO:-1}"
GLOBAL_BATCH="${GLOBAL_BATCH:-528}"
MICRO_BATCH="${MICRO_BATCH:-$(micro_batch_for 2)}"   # the largest <= 2 that splits 528: 2 x DP 8 x 33 steps
LR="${LR:-5e-4}"
MIN_LR="${MIN_LR:-1e-5}"
TRAIN_ITERS="${TRAIN_ITERS:-50000}"      # 528 x 2048 tokens each: ~54B tokens
WARMUP_ITERS="${WARMUP_ITERS:-2000}"
EMBEDDING_NORM="${EMBEDDING_NORM:-layernorm}"
DATA_PREFIX="${DATA_PREFIX:-data/c4/c4_text_document}"
VOCAB="${VOCAB:-data/gpt2/vocab.json}"
MERGES="${MERGES:-data/gpt2/merges.txt}"
RUN_DIR="${RUN_DIR:-runs/gpt_350m_lr${LR}_${EMBEDDING_NORM}}"
DS_CONFIG="${DS_CONFIG:-$REPO/examples/ds_zero${ZERO}.json}"

args=(
    # model: the paper's 350M, its initialisation and embedding fix
    --model-size 350m
    --init-method small
    --embedding-norm "$EMBEDDING_NORM"
    # parallelism and precision
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --zero-stage "$ZERO"
    --bf16
    # batch, optimizer, schedule
    --micro-batch-size "$MICRO_BATCH"
    --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS"
    --lr "$LR"
    --min-lr "$MIN_LR"
    --lr-warmup-iters "$WARMUP_ITERS"
    --lr-decay-iters "$TRAIN_ITERS"
    --lr-decay-style cosine
    --adam-beta1 0.9
    --adam-beta2 "${ADAM_BETA2:-0.95}"
    --weight-decay "${WEIGHT_DECAY:-0.1}"
    --clip-grad 1.0
    # data
    --data-path "$DATA_PREFIX"
    --split 969,30,1
    --tokenizer-type GPT2BPETokenizer
    --vocab-file "$VOCAB"
    --merge-file "$MERGES"
    # evaluation, logging, checkpoints, spikes
    --log-interval 10
    --eval-interval 1000
    --eval-iters 10
    --tensorboard-dir "$RUN_DIR/tensorboard"
    --log-stability-interval 100
    --save "$RUN_DIR/checkpoints"
    --load "$RUN_DIR/checkpoints"
    --save-interval 1000
    --spike-factor 3.0
    --deepspeed
    --deepspeed_config "$DS_CONFIG"
)
launch "${args[@]}" ${EXTRA_ARGS:-}
