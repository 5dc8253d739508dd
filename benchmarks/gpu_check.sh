#!/usr/bin/env bash
# The GPU check, for a lent machine with one GPU (an H200: CUDA, torch preinstalled, DeepSpeed
# carried as wheels in .whl/). Five minutes, extension build included:
#   1. install the wheels in .whl/ (offline: pip --no-index --no-deps), if there are any
#   2. build the C++/CUDA extensions in place        (python setup.py build_ext --inplace)
#   3. the CUDA tests of the fused LayerNorm, RMSNorm and the model (pytest --cuda -m cuda)
#   4. the LayerNorm and RMSNorm benchmarks on the GPU (benchmarks/{layer,rms}_norm.py --device cuda)
#   5. training throughput of the 350M preset in bf16, 30 steps, NCCL process group, tokens/s and
#      MFU against the H200's dense bf16 peak          (benchmarks/train_throughput.py)
#   6. the real job, 350M bf16 for 30 steps on one GPU under torchrun with NCCL, through
#      DeepSpeed, on the bundled sample tokenized with GPT-2 BPE (pretrain_gpt.py)
# Each step's log goes to $OUT (the device tool's output folder) or runs/gpu_check; the last lines
# printed are a summary with every step's status and the figures. Exit status: the number of failed steps.
#
#   bash benchmarks/gpu_check.sh
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # the same steps, tiny, on CPU (a dry run of this script)
#   SKIP_STEPS="build" ...                       # leave out steps by name (the test suite runs the CPU dry
#                                                # run this way: tests/test_gpu_check.py)
# Wheels for step 1, prepared on a machine with the registry: bash benchmarks/gpu_wheels.sh
# Step 6 is benchmarks/gpu_check_job.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-python}"
LOGS="${OUT:-$REPO/runs/gpu_check}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"   # H200 (and H100 SXM) dense bf16 peak
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=()
FAILED=0

# step NAME SECONDS CMD...: runs CMD with a time limit, its output in $LOGS/NAME.log.
step() {
    local name=$1 limit=$2 start rc
    shift 2
    if [[ " ${SKIP_STEPS:-} " == *" $name "* ]]; then
        SUMMARY+=("$name: skipped (SKIP_STEPS)")
        echo "== $name: skipped (SKIP_STEPS)"
        return
    fi
    start=$(date +%s)
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        SUMMARY+=("$name: ok (${took}s)")
    else
        [[ $rc -eq 124 || $rc -eq 137 ]] && rc="timeout after ${limit}s"
        SUMMARY+=("$name: FAILED ($rc, ${took}s; see $LOGS/$name.log)")
        FAILED=$((FAILED + 1))
        tail -n 25 "$LOGS/$name.log"
    fi
    echo "   ${SUMMARY[-1]}"
}

if [[ "$DEVICE" == cuda ]]; then
    LEG=bf16; PRECISION=(--bf16); MICRO=8; STEPS=30
    MODEL=(--model-size 350m)
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # Hopper; the build compiles for it only
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    PYTEST_CUDA=(--cuda -m cuda)
else  # the dry run: tiny shapes, fp32, gloo
    LEG=fp32; PRECISION=(); MICRO=2; STEPS=3
    MODEL=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128)
    export MEGATRON_SNM_CUDA=0
    PYTEST_CUDA=(-k "cpu and not bfloat16")
fi

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} >"$LOGS/environment.log" 2>&1
cat "$LOGS/environment.log"

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    step install_wheels 120 "$PYTHON" -m pip install --no-index --no-deps "${wheels[@]}"
fi

step build 200 "$PYTHON" setup.py build_ext --inplace
step pytest_cuda 120 "$PYTHON" -m pytest -q -p no:cacheprovider "${PYTEST_CUDA[@]}" \
    tests/test_layer_norm.py tests/test_rms_norm.py tests/test_model_cuda.py
for norm in layer_norm rms_norm; do
    step "${norm}_bench" 90 "$PYTHON" "benchmarks/$norm.py" --device "$DEVICE" \
        $([[ "$DEVICE" == cpu ]] && echo --repeats 1 --warmup 0 --min-seconds 0)
done

if [[ "$DEVICE" == cuda ]]; then
    step train_throughput 150 "$PYTHON" benchmarks/train_throughput.py --device cuda --model-size 350m \
        --legs bf16 --micro-batch-size "$MICRO" --steps "$STEPS" --warmup 3 --peak-tflops "$PEAK_TFLOPS"
else
    step train_throughput 300 "$PYTHON" benchmarks/train_throughput.py --legs fp32 --micro-batch-size 1 \
        --steps 1 --warmup 0
fi

if "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    step pretrain_gpt 240 bash benchmarks/gpu_check_job.sh "$LOGS/job" "$MICRO" "$STEPS" "${MODEL[@]}" "${PRECISION[@]}"
else
    SUMMARY+=("pretrain_gpt: SKIPPED (deepspeed is not importable; put its wheels in .whl/)")
    FAILED=$((FAILED + 1))
fi

echo
echo "== summary ($DEVICE; logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
for norm in layer_norm rms_norm; do
    [[ -f "$LOGS/${norm}_bench.log" ]] && tail -n 1 "$LOGS/${norm}_bench.log"
done
if [[ -f "$LOGS/train_throughput.log" ]]; then
    grep -E "^(leg|$LEG) " "$LOGS/train_throughput.log"
    tail -n 1 "$LOGS/train_throughput.log"
fi
if [[ -f "$LOGS/pretrain_gpt.log" ]]; then
    last=$(grep "tokens per second" "$LOGS/pretrain_gpt.log" | tail -n 1)
    echo "pretrain_gpt.py last iteration line:${last:- none}"
    tflops=$(sed -n 's/.*TFLOP\/s per rank: \([0-9.]*\).*/\1/p' <<<"$last")
    [[ -n "$tflops" && "$DEVICE" == cuda ]] && \
        awk -v t="$tflops" -v p="$PEAK_TFLOPS" 'BEGIN { printf "pretrain_gpt.py MFU: %.3f (%s of %s TFLOP/s)\n", t / p, t, p }'
fi
exit "$FAILED"
