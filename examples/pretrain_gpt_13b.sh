#!/usr/bin/env bash
# The paper's largest size from "Spike No More" (Takase et al., arXiv 2312.16903): a 13B GPT
# (GPT-3 13B / Megatron-LM: 40 layers, hidden 5120, 40 heads, sequence 2048) pre-trained on C4
# (GPT-2 BPE) with Adam, global batch 528, bf16, scaled initialisation (sigma = sqrt(2/(5d)), W_O
# and W_2 by 1/sqrt(2N)) plus Embed LN: the paper's stable recipe. LR=5e-4 is the paper's usual
# rate, LR=1e-3 the large one. EMBEDDING_NORM=none gives the vanilla baseline, =scaled Scaled
# Embed, =detach Embed Detach.
# Adam's beta2, weight decay, clipping, warm-up and the training length: see paper_recipe.sh.
#
# Four nodes of 8 GPUs: TP=4 x PP=2 fills a node (tensor parallelism stays on NVLink), DP=4 over
# the nodes, ZeRO-1 (DeepSpeed's pipeline engine takes ZeRO 0-1 only), activations recomputed.
#   HOSTFILE=examples/hostfile.example bash examples/pretrain_gpt_13b.sh
#   NNODES=8 HOSTFILE=hosts bash examples/pretrain_gpt_13b.sh          # DP=8, 66 accumulation steps
# Data: see examples/README.md (tools/preprocess_data.py over C4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
usage_or_refuse_arguments "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh" \
    "$(dirname "${BASH_SOURCE[0]}")/launch.sh" -- "$@"
MODEL_SIZE=13b
NNODES="${NNODES:-4}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-4}"
PP="${PP:-2}"
MAX_MICRO_BATCH=1   # 1 x DP 4 x 132 accumulation steps = 528
SIZE_ARGS=(--checkpoint-activations)
source "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh"
