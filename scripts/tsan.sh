#!/usr/bin/env bash
# `make tsan`: builds segops with -fsanitize=thread (SEGOPS_SANITIZE=thread) in a staged copy of the tree (the
# normal build is untouched) and runs the lattice tests with 2 OpenMP threads under ThreadSanitizer, the
# compiler's libtsan preloaded into Python.
#
# libgomp (and torch) are not instrumented. So that TSan still sees the happens-before edges OpenMP
# provides, segops' CPU launcher (omp_parallel_for in csrc/include/segops/parallel.h) annotates each
# parallel region's fork and join with __tsan_release / __tsan_acquire -- what LLVM's Archer does through
# OMPT. Chunks of one region get no edge between them: races inside a region (the concurrent hash table,
# the splat, blur, slice) are reported. TSAN_OPTIONS:
#   ignore_noninstrumented_modules=1  interceptors (memset, memcpy, ...) called from uninstrumented torch /
#                                     libgomp code are not recorded: torch fills tensors inside its own
#                                     OpenMP regions, whose joins TSan cannot see (false positives otherwise)
#   halt_on_error=1 exitcode=66       the first report fails the run
#   report_signal_unsafe=0            CPython's signal handlers are not segops' business
# pytest runs with --capture=sys so that a report (written to fd 2) survives the exit it triggers.
# No suppressions file: nothing in segops is suppressed. Extra pytest arguments: PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
stage=${TMPDIR:-/tmp}/segops-tsan
bash scripts/stage_tree.sh "$stage"
(cd "$stage" && SEGOPS_SANITIZE=thread SEGOPS_CUDA=0 "$py" setup.py -q build_ext --inplace)
tsan=$(gcc -print-file-name=libtsan.so)
cd "$stage"
# The instrumented extension must really be instrumented (else this run would prove nothing).
nm -D segops/_C*.so | grep -q __tsan_func_entry || { echo "tsan.sh: segops/_C is not TSan-instrumented" >&2; exit 1; }
# Newer kernels' high-entropy mmap randomisation breaks TSan's fixed shadow layout: run without ASLR.
norand=""
if setarch "$(uname -m)" -R true 2>/dev/null; then norand="setarch $(uname -m) -R"; fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
LD_PRELOAD="$tsan" \
TSAN_OPTIONS="ignore_noninstrumented_modules=1:halt_on_error=1:exitcode=66:report_signal_unsafe=0:${TSAN_OPTIONS:-}" \
PYTHONPATH="$stage" $norand "$py" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow and not cuda" \
  ${PYTEST_ARGS:-tests/test_lattice_threads.py tests/test_permutohedral.py tests/test_crf_loss.py}
