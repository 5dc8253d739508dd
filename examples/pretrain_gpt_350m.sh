#!/usr/bin/env bash
# The paper's smallest size from "Spike No More" (Takase et al., arXiv 2312.16903): a 350M GPT
# (GPT-3 Medium: 24 layers, hidden 1024, 16 heads, sequence 2048) pre-trained on C4 (GPT-2 BPE)
# with Adam, global batch 528, bf16, scaled initialisation (sigma = sqrt(2/(5d)), W_O and W_2 by
# 1/sqrt(2N)) plus Embed LN: the paper's stable recipe. LR=5e-4 is the paper's usual rate, LR=1e-3
# the large one. EMBEDDING_NORM=none gives the vanilla baseline, =scaled Scaled Embed, =detach
# Embed Detach.
# Adam's beta2, weight decay, clipping, warm-up and the training length: see paper_recipe.sh.
#
# One node of 8 GPUs: the model fits on each GPU, so pure data parallelism (DP=8), ZeRO-1.
#   bash examples/pretrain_gpt_350m.sh
#   LR=1e-3 EMBEDDING_NORM=scaled bash examples/pretrain_gpt_350m.sh
#   NNODES=2 HOSTFILE=examples/hostfile.example bash examples/pretrain_gpt_350m.sh   # DP=16, micro-batch 1
# Data: see examples/README.md (tools/preprocess_data.py over C4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
usage_or_refuse_arguments "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh" \
    "$(dirname "${BASH_SOURCE[0]}")/launch.sh" -- "$@"
MODEL_SIZE=350m
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-1}"
PP="${PP:-1}"
MAX_MICRO_BATCH=2   # 2 x DP 8 x 33 steps
SIZE_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh"
