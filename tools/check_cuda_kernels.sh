#!/usr/bin/env bash
# Compiles every CUDA kernel file in csrc/ with nvcc for sm_80 and sm_90 (device code only,
# no torch headers), so a kernel that does not compile fails CI even on a machine without a GPU.
# Also checks that each kernel interface header (csrc/**/*_cuda.h) is plain C++: it must compile
# with the host compiler and the CUDA runtime headers alone, as the torch glue includes it.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  echo "check_cuda_kernels: nvcc not found, skipping"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for cu in $(find csrc -name '*.cu' | sort); do
  "$NVCC" -std=c++17 -O3 -c "$cu" -o "$out/$(basename "$cu").o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  echo "check_cuda_kernels: $cu compiles for sm_80 and sm_90"
done
for header in $(find csrc -name '*_cuda.h' | sort); do
  printf '#include "%s"\nint main() { return 0; }\n' "$PWD/$header" > "$out/header_check.cpp"
  "$NVCC" -std=c++17 -x c++ -c "$out/header_check.cpp" -o "$out/header_check.o"
  echo "check_cuda_kernels: $header is a plain C++ header"
done
