#!/usr/bin/env bash
# GPU check of the conv kernels (issue 4): build with CUDA, run tests/test_conv.py (device-parametrised tests
# and the @cuda parity tests run on the GPU), then the conv benchmark suite on CUDA. To be folded into
# scripts/gpu_check.sh. Writes the benchmark JSON to ${OUT:-benchmarks/results}.
set -euo pipefail
cd "$(dirname "$0")/.."
export SEGOPS_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
python setup.py -q build_ext --inplace
python -m pytest -q -p no:cacheprovider tests/test_conv.py -rs
python -m segops bench conv --device cuda --min-run-time 0.2 --out "${OUT:-benchmarks/results}"
