#!/usr/bin/env bash
# The one script to run on a lent GPU machine (Python 3.12 + torch 2.11 CUDA at `python3`, nvcc 13, no
# network). Builds segops in place for sm_90, runs the CUDA tests, compute-sanitizer (memcheck, racecheck,
# synccheck, initcheck) over a small driver of every CUDA kernel, and the GPU benchmarks. Everything lands in
# $OUT (default: ./gpu-check-out): gpu_check.log, summary.json, info.json, pytest-cuda.xml and one bench JSON
# per suite, and phases.md (the CUDA
# kernels of the lattice workloads, scripts/gpu_phases.py); the device tool brings back at most 8 files, so run it
# with OUT elsewhere and pack that folder into one archive. Each step has its own timeout and writes its
# results as it ends, so a run cut short still returns what finished. Budget: < 8 minutes on an H100/H200. Usage: OUT=/some/dir bash scripts/gpu_check.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# The machines' default CXX (/opt/gcc/bin/g++) links libstdc++ statically, which turns every C++ exception into a
# SIGSEGV (benchmarks/results/2026-11-26-h200-gpu-check/NOTES.md; setup.py refuses such a build): use the system g++.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} SEGOPS_CUDA=1
t_start=$(date +%s)
declare -A status

step() {  # step NAME TIMEOUT CMD...: runs a step, records its exit status and duration
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name"
  timeout "$limit" "$@"
  local rc=$?
  status[$name]="$rc $(( $(date +%s) - t0 ))"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step build 300 $PY setup.py -q build_ext --inplace || { echo "build failed"; }
step info 60 bash -c "$PY -m segops info --json > '$OUT/info.json' && cat '$OUT/info.json'"
# A failing TORCH_CHECK must surface as a Python exception on both backends (a segfault here was once reported).
step throw 60 $PY -c "
import segops, torch
for dev in ('cpu', 'cuda'):
    x = torch.randn(1, 3, 2, 2, device=dev); t = torch.zeros(1, 2, 2, dtype=torch.long, device=dev); t[0, 0, 0] = 7
    try:
        segops.ops.partial_cross_entropy(x, t, check_labels=True); print('throw', dev, 'NO ERROR'); raise SystemExit(1)
    except (RuntimeError, ValueError, IndexError) as e:
        print('throw', dev, 'caught', type(e).__name__, str(e).splitlines()[0][:100])
"
# Every test with "cuda" in its id: the @cuda parity tests and each device-parametrised test's cuda case.
# pytest-xdist workers, so that a crashing test is reported as such and the rest still run.
step pytest_cuda 300 $PY -m pytest -q -k cuda -n 8 -p no:cacheprovider --junitxml="$OUT/pytest-cuda.xml" tests
bench() {  # bench SUITE...: one `segops bench` step per suite, its JSON in $OUT
  [ "${NO_BENCH:-0}" = 1 ] && return 0
  local suite
  for suite in "$@"; do
    # losses: four torch.compile builds (two shapes, two ops) besides the timings
    step "bench_$suite" $([ "$suite" = losses ] && echo 240 || echo 150) $PY -m segops bench "$suite" --device cuda --min-run-time 0.3 --out "$OUT"
  done
}
[ "${1:-}" = "--no-bench" ] && NO_BENCH=1
# models: 321x321 only (widths 0.25 and 1.0, auto / segops / vendor / torch and the deterministic column) to fit
# the step's time; `segops bench models --device cuda` alone also runs 161x161
export SEGOPS_BENCH_SIZES=${SEGOPS_BENCH_SIZES:-321}
# Ordered by what a run cut short should still bring back: the lattice suites' targets and kernel breakdown, then
# the memory checkers over every kernel, then the other suites.
bench crf crf-inference
[ "${NO_BENCH:-0}" = 1 ] || step phases 120 bash -c "$PY scripts/gpu_phases.py > '$OUT/phases.md'; rc=\$?; cat '$OUT/phases.md'; exit \$rc"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "sanitizer_$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      $PY scripts/cuda_driver.py
  done
else
  echo "compute-sanitizer not found"; status[sanitizer]="127 0"
fi
bench conv models losses

{
  echo "{"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"gpu\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\","
  echo "  \"driver\": \"$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)\","
  echo "  \"torch\": \"$($PY -c 'import torch; print(torch.__version__)')\","
  echo "  \"seconds\": $(( $(date +%s) - t_start )),"
  echo "  \"steps\": {"
  first=1
  for k in "${!status[@]}"; do
    set -- ${status[$k]}
    [ $first = 1 ] || echo ","
    printf '    "%s": {"rc": %s, "seconds": %s}' "$k" "$1" "$2"
    first=0
  done
  echo ""
  echo "  }"
  echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"
echo "gpu_check finished in $(( $(date +%s) - t_start )) s"
