#!/usr/bin/env bash
# `make sanitize`: builds segops with -fsanitize=address,undefined in a separate staged tree (the normal build
# is untouched) and runs the test suite against it with the compiler's ASan runtime preloaded into Python.
#   ASAN_OPTIONS: detect_leaks=0           CPython and torch keep allocations alive at exit by design
#                 alloc_dealloc_mismatch=0  torch's libraries (not built with ASan) mix allocators legitimately
#                 halt_on_error=1 abort_on_error=1   the first real error stops the run with a report
#   UBSAN_OPTIONS: halt_on_error=1 print_stacktrace=1
# Nothing from segops is suppressed. --capture=sys: pytest must not hold fd 2, or an aborting report is lost.
# Extra pytest arguments: PYTEST_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
stage=${TMPDIR:-/tmp}/segops-sanitize
bash scripts/stage_tree.sh "$stage"
(cd "$stage" && SEGOPS_SANITIZE=1 SEGOPS_CUDA=0 "$py" setup.py -q build_ext --inplace)
# A run against an uninstrumented build would pass vacuously. (Counted, not `grep -q`: grep -q leaves at the
# first match, nm then dies of SIGPIPE, and pipefail reports the pipeline as failed on an instrumented build.)
[ "$(nm "$stage"/segops/_C*.so | grep -c __asan_init)" -gt 0 ] || {
  echo "sanitize: the staged build is not ASan-instrumented"; exit 1; }
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
cd "$stage"
LD_PRELOAD="$asan $ubsan" \
ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$stage" "$py" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow and not cuda" ${PYTEST_ARGS:-} tests
