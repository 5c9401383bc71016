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
#
# `bash scripts/tsan.sh --selftest` first proves the setup can see a race: it seeds one (the host
# atomic_cas of the packed hash table made a plain read-modify-write) in a second staged tree and
# requires TSan to report it (exit 66) on tests/test_lattice_threads.py, then runs the real check.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-$repo/.venv/bin/python}
tsan=$(gcc -print-file-name=libtsan.so)
norand=""
# Newer kernels' high-entropy mmap randomisation breaks TSan's fixed shadow layout: run without ASLR.
if setarch "$(uname -m)" -R true 2>/dev/null; then norand="setarch $(uname -m) -R"; fi
run_tsan() {  # $1 = staged tree, rest = pytest arguments
  local tree=$1
  shift
  (cd "$tree" && OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} LD_PRELOAD="$tsan" \
    TSAN_OPTIONS="ignore_noninstrumented_modules=1:halt_on_error=1:exitcode=66:report_signal_unsafe=0:${TSAN_OPTIONS:-}" \
    PYTHONPATH="$tree" $norand "$py" -m pytest -q -p no:cacheprovider --capture=sys -m "not slow and not cuda" "$@")
}
build_tsan() {
  (cd "$1" && SEGOPS_SANITIZE=thread SEGOPS_CUDA=0 "$py" setup.py -q build_ext --inplace)
  # The extension must really be instrumented (else a clean run would prove nothing).
  nm -D "$1"/segops/_C*.so > "$1/.symbols"
  grep -q __tsan_func_entry "$1/.symbols" || { echo "tsan.sh: $1/segops/_C is not TSan-instrumented" >&2; exit 1; }
}
if [ "${1:-}" = "--selftest" ]; then
  seeded=${TMPDIR:-/tmp}/segops-tsan-seeded
  bash scripts/stage_tree.sh "$seeded"
  "$py" - "$seeded/csrc/include/segops/parallel.h" <<'PYEOF'
import sys
p = sys.argv[1]
s = open(p).read()
anchor = "SEGOPS_HD_INLINE int64_t atomic_cas(int64_t* address, int64_t expected, int64_t desired) {"
i = s.index("#else", s.index(anchor)) + len("#else")
s = s[:i] + "\n  if (*address == expected) { *address = desired; return expected; }  // seeded race\n  return *address;" + s[i:]
open(p, "w").write(s)
PYEOF
  build_tsan "$seeded"
  set +e
  run_tsan "$seeded" -x tests/test_lattice_threads.py > "$seeded/report.txt" 2>&1
  rc=$?
  set -e
  if [ $rc -ne 66 ] || ! grep -q "WARNING: ThreadSanitizer: data race" "$seeded/report.txt"; then
    echo "tsan.sh --selftest: the seeded race was NOT reported (exit $rc); see $seeded/report.txt" >&2
    exit 1
  fi
  echo "tsan.sh --selftest: the seeded race was reported:"
  grep -A3 "WARNING: ThreadSanitizer" "$seeded/report.txt" | cut -c1-160
fi
stage=${TMPDIR:-/tmp}/segops-tsan
bash scripts/stage_tree.sh "$stage"
build_tsan "$stage"
# shellcheck disable=SC2086
run_tsan "$stage" ${PYTEST_ARGS:-tests/test_lattice_threads.py tests/test_permutohedral.py tests/test_crf_loss.py}
