#!/usr/bin/env bash
# The C++ sources must compile as C++17: torch < 2.10 builds extensions with -std=c++17 (torch 2.11 on the lent GPU
# machines did, and one C++20 `concept` stopped that build), and segops supports torch >= 2.6. Checks every host
# source with g++ -std=c++17 -fsyntax-only against the installed torch's headers (~1 min on 2 cores). The .cu
# files share the same headers; nvcc's own pass is the CUDA compile check's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
read -r -a INC < <("$PY" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join(['-I' + p for p in include_paths()] + ['-I' + sysconfig.get_paths()['include']]))")
fail=0
for f in csrc/segops.cpp csrc/cpu/*.cpp; do
  if ! "$CXX" -std=c++17 -fsyntax-only -fopenmp -w -Icsrc/include "${INC[@]}" "$f"; then
    echo "cxx17_check: $f does not compile as C++17" >&2
    fail=1
  fi
done
[ $fail = 0 ] && echo "cxx17_check: every host source compiles as C++17"
exit $fail
