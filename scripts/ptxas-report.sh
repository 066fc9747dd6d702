#!/usr/bin/env bash
# Offline check of the CUDA kernels, no GPU needed: NVRTC compiles every conformance config's
# module to PTX (tests/cuda_conformance.rs, kernels_compile_for_sm90), then ptxas assembles it for
# sm_90 and prints registers, spills and shared memory per kernel.
#
# Needs libnvrtc and ptxas. Both come from PyPI wheels (no CUDA install):
#   pip download --no-deps -d W nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86
#   then unzip them; CUDA_TOOLS=<unzipped>/nvidia (holds cuda_nvrtc/lib and cuda_nvcc/bin).
set -euo pipefail
tools=${CUDA_TOOLS:?set CUDA_TOOLS to the unzipped nvidia/ folder of the wheels}
out=${1:-target/ptx}
mkdir -p "$out"
LD_LIBRARY_PATH="$tools/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" KVTIER_PTX_DIR="$(realpath "$out")" \
  cargo test -q --features cuda --test cuda_conformance kernels_compile_for_sm90 >/dev/null
for f in "$out"/*.ptx; do
  echo "== $(basename "$f" .ptx)"
  "$tools/cuda_nvcc/bin/ptxas" -arch=sm_90 -v -o /dev/null "$f" 2>&1 | grep -A1 "kvt_decode" | grep -E "registers|spill|stack" || true
done
