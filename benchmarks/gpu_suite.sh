#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension there, run every test on the GPU
# (CUDA and compiled Triton backends, the >2^31-element test included), run the benchmarks,
# and write everything under $OUT (default: benchmarks/results/gpu-<date>).
# Uses the machine's own python3 (torch, triton, pytest, hypothesis preinstalled); no network.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JACFAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# Only the local architecture: a faster build, and sm_90 code on Hopper.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
status=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{ $PY -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print(torch.cuda.get_device_name())'; } > "$OUT/versions.txt" 2>&1
$PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
run() {  # run "$@" with its output in $OUT/$name.txt; remember a failure, keep going
  local name=$1; shift
  "$@" > "$OUT/$name.txt" 2>&1 || { status=1; echo "$name FAILED"; }
  tail -40 "$OUT/$name.txt"
}
run check $PY -m jacfast check
run pytest $PY -m pytest -q tests --runslow -p no:cacheprovider
run bench $PY -m jacfast bench --suite full --device cuda --out "$OUT"
$PY benchmarks/plot.py "$OUT" > /dev/null 2>&1 || true
echo "results in $OUT (status $status)"
exit $status
