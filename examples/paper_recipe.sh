# Sourced by pretrain_gpt_{350m,1.7b,13b}.sh and pretrain_llama_1b.sh once they have set MODEL_SIZE, NNODES, GPUS_PER_NODE,
# TP, PP, MAX_MICRO_BATCH and SIZE_ARGS (flags of that size only): the paper's recipe, the same for
# every size, then the launch (examples/launch.sh).
# Adam's beta2, weight decay, clipping, warm-up and the training length are not the paper's
# figures but GPT-3's / Megatron-LM's (each is an environment variable).
#
# Variables (default): LR (5e-4; 1e-3 the large rate), MIN_LR (1e-5), EMBEDDING_NORM (layernorm;
# none|scaled|detach for the baselines), TRAIN_ITERS (50000), WARMUP_ITERS (2000), ADAM_BETA2 (0.95),
# WEIGHT_DECAY (0.1), GLOBAL_BATCH (528), MICRO_BATCH (the largest up to the script's that splits the
# global batch over the data-parallel ranks), TP, PP, ZERO (1), DS_CONFIG (examples/ds_zeroZERO.json),
# DATA_PREFIX (data/c4/c4_text_document), VOCAB, MERGES (data/gpt2/vocab.json, merges.txt), RUN_DIR
# (runs/gpt_SIZE_lrLR_EMBEDDING_NORM: checkpoints, resumed from if present, and TensorBoard),
# EXTRA_ARGS (more pretrain_gpt.py flags), DRY_RUN=1 (print the command, launch nothing).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    source "$(dirname "${BASH_SOURCE[0]}")/help.sh"
    usage_or_refuse_arguments "${BASH_SOURCE[0]}" -- "$@"
    echo "error: examples/paper_recipe.sh is sourced by pretrain_gpt_{350m,1.7b,13b}.sh; run one of those" >&2
    exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"

ZERO="${ZERO:-1}"
GLOBAL_BATCH="${GLOBAL_BATCH:-528}"
MICRO_BATCH="${MICRO_BATCH:-$(micro_batch_for "$MAX_MICRO_BATCH")}"
LR="${LR:-5e-4}"
MIN_LR="${MIN_LR:-1e-5}"
TRAIN_ITERS="${TRAIN_ITERS:-50000}"      # 528 x 2048 tokens each: ~54B tokens
WARMUP_ITERS="${WARMUP_ITERS:-2000}"
EMBEDDING_NORM="${EMBEDDING_NORM:-layernorm}"
DATA_PREFIX="${DATA_PREFIX:-data/c4/c4_text_document}"
VOCAB="${VOCAB:-data/gpt2/vocab.json}"
MERGES="${MERGES:-data/gpt2/merges.txt}"
RUN_DIR="${RUN_DIR:-runs/gpt_${MODEL_SIZE}_lr${LR}_${EMBEDDING_NORM}}"
DS_CONFIG="${DS_CONFIG:-$REPO/examples/ds_zero${ZERO}.json}"

args=(
    # model: the paper's size, its initialisation and embedding fix
    --model-size "$MODEL_SIZE"
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
launch "${args[@]}" "${SIZE_ARGS[@]}" ${EXTRA_ARGS:-}
