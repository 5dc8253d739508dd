#!/usr/bin/env bash
# The stability study's evidence on one GPU (an H100/H200), at most 8 minutes: a GPT-2-small-sized
# model (12 layers, d 768, 12 heads of 64, sequence 1024, ~125M parameters with a 50K vocabulary),
# bf16, the recipe of the CPU study (beta2 0.95, weight decay 0.1, clipping 1.0, warm-up 10%,
# cosine decay, sigma 0.0132 with W_O and W_2 scaled), vanilla against Embed LN and Scaled Embed at
# two learning rates, 6 runs of pretrain_gpt.py one after the other through tools/stability_sweep.py.
# Writes under $OUT (the device tool's output folder) or --output-dir / runs/gpu_stability:
#   study/report.json, study/report.md, study/final_loss_vs_lr.png   (the sweep's report)
#   study/summary.json                                               (per run: spikes, losses, tokens/s)
#   plots/*-loss.png, plots/*-grad_norm.png                          (tools/plot_stability.py)
#   environment.log, and the last lines printed: the report's table.
#
#   bash benchmarks/gpu_stability.sh                                # on the GPU
#   DATA_PREFIX=runs/stab-data/c4_text_document TOKENIZER_MODEL=runs/stab-data/sp4k.model \
#       bash benchmarks/gpu_stability.sh        # a real corpus: the CPU study's, 29 MB, copied
#       # beforehand with cp /work/stab-data/{c4_text_document.bin,c4_text_document.idx,sp4k.model}
#       # runs/stab-data/ and carried to the device machine (runs/ is not in git)
#   DEVICE=cpu bash benchmarks/gpu_stability.sh --output-dir /tmp/x  # the dry run: tiny, a few steps
#
# Data: DATA_PREFIX (a preprocessed .bin/.idx) with TOKENIZER_MODEL (SentencePiece) if set; else
# the bundled C4 sample (data/sample, ~0.3 M GPT-2 tokens: repeated many times at this size, so the
# final losses show memorisation; the spikes and divergences are still the methods'), tokenized
# with GPT-2's files if found (../shared/data/gpt2, shared/data/gpt2, data/gpt2), else a
# SentencePiece model trained on it. The GPU machine has no network: everything is local.
# Variables (default): LRS ("6e-4 6e-3"), METHODS ("vanilla embed-ln scaled-embed"), STEPS (300),
# BATCH (32 sequences), SEED (1), PYTHON (python), TIME_LIMIT (470 s for the runs together).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
OUTPUT="${OUT:-$REPO/runs/gpu_stability}"
if [[ "${1:-}" == --output-dir ]]; then
    OUTPUT=$2
    shift 2
fi
if (($#)); then
    echo "usage: [DEVICE=cpu] bash benchmarks/gpu_stability.sh [--output-dir DIR]" >&2
    exit 2
fi
mkdir -p "$OUTPUT"
OUTPUT="$(cd "$OUTPUT" && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if [[ "$DEVICE" == cuda ]]; then
    SHAPE=(--hidden-size 768 --head-dim 64 --num-layers 12 --seq-length 1024 --batch-size "${BATCH:-32}"
           --train-iters "${STEPS:-300}" --eval-interval "${STEPS:-300}" --eval-iters 8
           --log-interval 10 --log-stability-interval 10)
    EXTRA="--bf16"
    LRS="${LRS:-6e-4 6e-3}"
else  # the dry run: the same commands, tiny, fp32 on CPU
    SHAPE=(--hidden-size 32 --head-dim 16 --num-layers 2 --seq-length 64 --batch-size 2
           --train-iters 4 --eval-interval 4 --eval-iters 1 --log-interval 1 --log-stability-interval 2)
    EXTRA=""
    LRS="${LRS:-1e-3 1e-2}"
fi

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >"$OUTPUT/environment.log" 2>&1
cat "$OUTPUT/environment.log"
if [[ "$DEVICE" == cuda ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: DEVICE=cuda but torch sees no GPU (DEVICE=cpu is the dry run)" >&2
    exit 2
fi
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})) && ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}" >"$OUTPUT/install_wheels.log" 2>&1
fi

if [[ -n "${DATA_PREFIX:-}" ]]; then
    DATA=(--data-path "$DATA_PREFIX" --tokenizer-type SentencePieceTokenizer
          --tokenizer-model "${TOKENIZER_MODEL:?DATA_PREFIX needs TOKENIZER_MODEL}")
    SPLIT=980,20,0
else
    source benchmarks/sample_dataset.sh
    tokenize_sample "$OUTPUT/data" >"$OUTPUT/preprocess.log" 2>&1
    DATA=(--data-path "$OUTPUT/data/sample_text_document" "${tokenizer[@]}")
    SPLIT=85,15,0  # the 21-document sample: 3 validation documents the runs never train on
fi

# shellcheck disable=SC2086  # METHODS and LRS are lists
SWEEP=(tools/stability_sweep.py "${DATA[@]}" --output-dir "$OUTPUT/study"
       --method ${METHODS:-vanilla embed-ln scaled-embed} --architecture gpt2 --lr $LRS --seed "${SEED:-1}"
       "${SHAPE[@]}" --split "$SPLIT" --extra-args "$EXTRA")
rc=0
timeout --kill-after=10 "${TIME_LIMIT:-470}" "$PYTHON" "${SWEEP[@]}" --jobs 1 >"$OUTPUT/sweep.log" 2>&1 || rc=$?
if ((rc)); then  # out of time or a run failed: report what finished
    tail -n 30 "$OUTPUT/sweep.log"
    [[ $rc -eq 124 || $rc -eq 137 ]] &&
        echo "the runs took longer than TIME_LIMIT=${TIME_LIMIT:-470}s: the report holds those that finished"
    compgen -G "$OUTPUT/study/runs/*/result.json" >/dev/null || exit "$rc"
    "$PYTHON" "${SWEEP[@]}" --report-only >>"$OUTPUT/sweep.log" 2>&1 || exit "$rc"
fi
"$PYTHON" tools/plot_stability.py "$OUTPUT/study" --output-dir "$OUTPUT/plots" >"$OUTPUT/plots.log" 2>&1
sed -n '/^run /,/^$/p' "$OUTPUT/sweep.log"
grep -A 8 "^| architecture | method | LR sensitivity" "$OUTPUT/study/report.md"
echo "figures: $OUTPUT/study/final_loss_vs_lr.png $OUTPUT/plots/"
exit "$rc"
