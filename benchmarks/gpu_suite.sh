#!/usr/bin/env bash
# One command on a lent GPU machine, sized to its lease: build the extensions there, test the
# GPU backends, run the benchmarks, test the rest, and leave under $OUT at most 8 files (all
# that comes back from such a machine): suite.log, every stage's output in order, and one
# JSON file per benchmark (benchmarks/results/ takes them as they are).
#
# Every stage runs under what is left of one budget, JACFAST_GPU_BUDGET_S seconds (default
# 540, inside a 600-s call). The benchmarks stop starting new configurations when their share
# runs out and write their rows as they go, so a run cut short still leaves what it
# measured, marked incomplete. Order: the GPU backends' tests, then the benchmarks the GPU
# targets need (the top-k seeds, short; the loss head's fwd+bwd in fp32, bf16, then fp16;
# the training step last, its targets are the CPU's), then the other tests.
# Uses the machine's own python3 (torch, triton, pytest preinstalled); no network.
# Afterwards, here: copy the JSON files into benchmarks/results/ and suite.log to
# benchmarks/results/gpu_suite-<device>-<date>.log, then run benchmarks/report.py (it writes the plots too).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%S)}
BUDGET=${JACFAST_GPU_BUDGET_S:-540}
mkdir -p "$OUT"
LOG=$OUT/suite.log
: > "$LOG"
export PYTHONUNBUFFERED=1 JACFAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
START=$(date +%s)
status=0

left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME MAX_SECONDS CMD...: CMD's output into the log, for at most MAX_SECONDS or what is
# left of the budget; a failure or a timeout is remembered (exit status) and the suite goes on.
stage() {
  local name=$1 limit=$2 rc t0
  shift 2
  ((limit > $(left))) && limit=$(left)
  if ((limit < 10)); then
    echo "== $name: not run, the budget is spent" | tee -a "$LOG"
    status=1
    return 1
  fi
  echo "== $name (at most ${limit} s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')" | tee -a "$LOG"
  ((rc != 0)) && status=1
  return $rc
}

have() { $PY -c "import $1" > /dev/null 2>&1; }

stage gpu 30 nvidia-smi
stage versions 60 $PY -c 'import sys, torch, triton, numpy; print(sys.version, "torch", torch.__version__, "cuda",
torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__, torch.cuda.get_device_name())'
# Only the local architecture: a faster build, and sm_90 code on Hopper.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
if ! stage build 300 $PY setup.py -q build_ext --inplace; then
  # Without the CUDA extension the Triton and CPU backends still have something to say.
  stage build-cpu-only 120 env JACFAST_BUILD_CUDA=0 $PY setup.py -q build_ext --inplace
fi
stage check 60 $PY -m jacfast check

# pytest: -n (xdist) spreads Triton's compiles over the cores, --timeout stops a hung test,
# -v names every test as it ends, so a stage cut short still says what passed and failed.
PYTEST=($PY -m pytest tests --runslow -p no:cacheprovider -rfE -v)
have xdist && PYTEST+=(-n 8)
have pytest_timeout && PYTEST+=(--timeout 240)
stage tests-gpu 150 "${PYTEST[@]}" -k "cuda or triton"

# Benchmarks, all but the last 60 s: the top-k seeds and strategies (short), the loss head
# (fwd+bwd, what the targets and the README use), then the training step (its targets are the
# CPU's); the bench stops starting configurations at --time-budget, a stage limit backs it up.
bench_share=$(($(left) - 60))
((bench_share < 30)) && bench_share=30
stage bench $((bench_share + 45)) $PY -m jacfast bench --suite full --device cuda --out "$OUT" \
  --only selection loss_head training_step --modes fwd+bwd --time-budget $bench_share

stage tests-rest 600 "${PYTEST[@]}" -k "not (cuda or triton)"
echo "results in $OUT (exit $status, $(($(date +%s) - START)) s)" | tee -a "$LOG"
exit $status
