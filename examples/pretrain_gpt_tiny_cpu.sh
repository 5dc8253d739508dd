#!/usr/bin/env bash
# The README's main job (`make demo`): a tiny GPT pre-trained on the bundled C4-format sample, on
# CPU, with 2 processes under the deepspeed launcher (gloo, data parallel, ZeRO-1). A few minutes:
#   1. train a SentencePiece tokenizer on the sample        (tools/train_tokenizer.py)
#   2. tokenize the sample into Megatron's .bin/.idx format (tools/preprocess_data.py)
#   3. pre-train with the paper's recipe (scaled init + Embed LN), validating as it goes, and
#      save a checkpoint at the end; then check the validation loss fell.
# Everything lands in $OUT (default ./runs/tiny-cpu); a re-run reuses the tokenizer and the
# tokenized data but trains from scratch, replacing $OUT/checkpoints and $OUT/tensorboard (resuming
# is `--load`, see the README).
#
# Variables (default): OUT (runs/tiny-cpu), NPROC (2 processes), TRAIN_ITERS (160), PYTHON
# (.venv/bin/python, else python), DEEPSPEED (the deepspeed beside PYTHON), OMP_NUM_THREADS (1),
# DRY_RUN=1 (print the commands it would run; deletes, writes and launches nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
source examples/help.sh
usage_or_refuse_arguments examples/pretrain_gpt_tiny_cpu.sh -- "$@"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
command -v "$DEEPSPEED" >/dev/null || DEEPSPEED=deepspeed
OUT=${OUT:-runs/tiny-cpu}
NPROC=${NPROC:-2}
TRAIN_ITERS=${TRAIN_ITERS:-160}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# run CMD...: runs CMD, or under DRY_RUN=1 prints it.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then shell_words "$@"; else "$@"; fi
}
[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$OUT"

if [ ! -f "$OUT/tokenizer.model" ]; then
  run "$PY" tools/train_tokenizer.py --input data/sample/c4-train.00000-of-00001.json.gz \
      --model-prefix "$OUT/tokenizer" --vocab-size 2000
fi
if [ ! -f "$OUT/c4_text_document.idx" ]; then
  run "$PY" tools/preprocess_data.py --input data/sample/c4-train.00000-of-00001.json.gz \
      --output-prefix "$OUT/c4" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2
fi

# 2 processes x 1 thread each on a 2-core machine; more threads per process only contend.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# would delete $OUT/checkpoints and $OUT/tensorboard (a fresh run), then:"
  train() { run "$@"; }
else
  rm -rf "$OUT/checkpoints" "$OUT/tensorboard"
  train() { "$@" 2>&1 | tee "$OUT/train.log"; }
fi
train "$DEEPSPEED" --num_gpus "$NPROC" pretrain_gpt.py \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
    --init-method small --embedding-norm layernorm \
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 \
    --zero-stage 1 \
    --data-path "$OUT/c4_text_document" --split 85,10,5 --data-cache-path "$OUT/index-cache" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --log-interval 20 --eval-interval 40 --eval-iters 4 \
    --log-stability-interval 40 --tensorboard-dir "$OUT/tensorboard" \
    --save "$OUT/checkpoints" --save-interval 80
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0

# The validation loss must have fallen, and a checkpoint must exist.
"$PY" - "$OUT" <<'PY'
import re, sys, pathlib
out = pathlib.Path(sys.argv[1])
losses = [float(x) for x in re.findall(r"validation loss at iteration \d+ \| lm loss value: (\S+)", (out / "train.log").read_text())]
latest = (out / "checkpoints" / "latest").read_text().strip()
if len(losses) < 2 or not losses[-1] < losses[0]:
    sys.exit(f"demo: the validation loss did not fall: {losses}")
print(f"demo: validation loss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpoint {out / 'checkpoints' / latest}")
PY
