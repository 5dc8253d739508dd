#!/usr/bin/env bash
# Prepares .whl/ for benchmarks/gpu_check.sh on a machine that can reach the package registry: the
# GPU machine has CUDA torch but not DeepSpeed, nor what our build, data tools and DeepSpeed import.
# gpu_check.sh installs every wheel here with `pip install --no-index --no-deps`; pip resolves the
# list below with its dependencies, for the GPU machine's Python: DeepSpeed's run-time requirements
# (torch and numpy are there already), pybind11 and ninja for setup.py, the data tools' tokenizers.
#   bash benchmarks/gpu_wheels.sh                     # for the GPU machine's Python (default 3.11)
#   GPU_PYTHON_VERSION=3.12 bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
PYVER="${GPU_PYTHON_VERSION:-3.11}"
mkdir -p .whl
# DeepSpeed is published as a source archive only: build its (pure Python) wheel here, against
# the torch installed here; no CUDA ops are compiled ahead of time (they are JIT-built if used).
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
"$PYTHON" -m pip download --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl \
    hjson msgpack ninja py-cpuinfo einops "pydantic>=2" packaging psutil tqdm pybind11 sentencepiece tokenizers
ls -1 .whl
