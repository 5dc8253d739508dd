#!/usr/bin/env bash
# A Llama-family model with the paper's fix: Llama 3.2 1B's shape (16 layers, hidden 2048, 32 query
# heads sharing 8 key/value heads, SwiGLU FFN 8192, RMSNorm, rotary positions with base 500000, no
# biases, tied embeddings) pre-trained with the recipe of examples/paper_recipe.sh: scaled
# initialisation (sigma = sqrt(2/(5d)) ~ 0.014, W_O and SwiGLU's down-projection by 1/sqrt(2N)) plus
# Embed LN, which in this model is an RMSNorm on the token embedding. With rotary positions the
# embedding is the token table alone, so without the fix the first RMSNorm amplifies the shallow
# gradients by ~1/sigma ~ 70 (tools/stability_at_init.py --architecture llama measures it).
# EMBEDDING_NORM=none gives the vanilla Llama baseline, =scaled Scaled Embed.
#
# One node of 8 GPUs: TP=2 with sequence parallelism inside the node, DP=4, ZeRO-1.
#   bash examples/pretrain_llama_1b.sh
#   LR=1e-3 EMBEDDING_NORM=none bash examples/pretrain_llama_1b.sh      # the paper's spiky baseline
#   DRY_RUN=1 bash examples/pretrain_llama_1b.sh                         # print the command only
# Data: see examples/README.md (tools/preprocess_data.py over C4; GPT-2 BPE by default, any
# tokenizer through EXTRA_ARGS, e.g. EXTRA_ARGS="--tokenizer-type SentencePieceTokenizer
# --tokenizer-model llama.model" with data preprocessed by that tokenizer).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
usage_or_refuse_arguments "${BASH_SOURCE[0]}" "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh" \
    "$(dirname "${BASH_SOURCE[0]}")/launch.sh" -- "$@"
MODEL_SIZE=llama-1b
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TP="${TP:-2}"
PP="${PP:-1}"
MAX_MICRO_BATCH=4   # 4 x DP 4 x 33 steps
SIZE_ARGS=(--position-embedding-type rope --rotary-base 500000 --normalization RMSNorm --swiglu
           --ffn-hidden-size 8192 --group-query-attention --num-query-groups 8 --disable-bias-linear
           --sequence-parallel)
source "$(dirname "${BASH_SOURCE[0]}")/paper_recipe.sh"
