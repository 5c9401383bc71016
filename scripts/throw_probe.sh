#!/usr/bin/env bash
# Diagnoses "a failing TORCH_CHECK crashes Python" on a machine (seen on the lent GPU machines, whose
# compiler is /opt/gcc). Compiles a one-op TORCH_LIBRARY extension that fails a TORCH_CHECK under several
# flag/compiler variants, calls it in a fresh process each, and prints which variants raise and which crash,
# with the C++ runtimes each .so and the process resolve. Then the same for segops' own CPU build.
# Usage: bash scripts/throw_probe.sh [--segops]   (writes into ${OUT:-/tmp/throw-probe})
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/throw-probe}; mkdir -p "$OUT"; W=$(mktemp -d)
PY=${PYTHON:-python3}
TI=$($PY -c 'import torch.utils.cpp_extension as c; print(" ".join("-I"+p for p in c.include_paths()))')
TL=$($PY -c 'import torch.utils.cpp_extension as c; print(c.library_paths()[0])')
CXX_DEFAULT=$($PY -c 'import torch.utils.cpp_extension as c, os; print(os.environ.get("CXX", "c++"))')
cat > "$W/probe.cpp" <<'CPP'
#include <ATen/ATen.h>
#include <torch/library.h>
static at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.numel() > 5, "x: expected more than 5 elements, got ", x.numel());
  return x.clone();
}
// TORCH_CHECK_INDEX throws c10::IndexError from this library's own code (TORCH_CHECK throws inside libc10).
static at::Tensor probe_fail_index(const at::Tensor& x) {
  TORCH_CHECK_INDEX(x.numel() > 5, "x: expected more than 5 elements, got ", x.numel());
  return x.clone();
}
TORCH_LIBRARY(segprobe, m) {
  m.def("fail(Tensor x) -> Tensor", &probe_fail);
  m.def("fail_index(Tensor x) -> Tensor", &probe_fail_index);
}
CPP
echo "compilers: c++=$(command -v c++) g++=$(command -v g++) cxx_default=$CXX_DEFAULT"
for c in c++ g++ /usr/bin/g++ /opt/gcc/bin/g++; do [ -x "$(command -v $c)" ] && echo "  $c: $($c --version | head -1)"; done
declare -A V
V[hidden_omp]="c++|-O3 -fopenmp -fvisibility=hidden -fno-trapping-math|-fopenmp"
V[plain]="c++|-O3|"
V[hidden]="c++|-O3 -fvisibility=hidden|"
V[omp]="c++|-O3 -fopenmp|-fopenmp"
[ -x /usr/bin/g++ ] && V[sys_hidden_omp]="/usr/bin/g++|-O3 -fopenmp -fvisibility=hidden -fno-trapping-math|-fopenmp"
[ -x /usr/bin/g++ ] && V[sys_plain]="/usr/bin/g++|-O3|"
[ -x /opt/gcc/bin/g++ ] && V[optgcc_hidden_omp]="/opt/gcc/bin/g++|-O3 -fopenmp -fvisibility=hidden -fno-trapping-math|-fopenmp"
[ -x /opt/gcc/bin/g++ ] && V[optgcc_plain]="/opt/gcc/bin/g++|-O3|"
for k in "${!V[@]}"; do
  IFS='|' read -r cxx cflags lflags <<< "${V[$k]}"
  ( $cxx -shared -fPIC -std=c++17 $cflags $TI "$W/probe.cpp" -L"$TL" -lc10 -ltorch_cpu $lflags \
      -Wl,-rpath,"$TL" -o "$W/probe_$k.so" > "$W/build_$k.log" 2>&1 || echo "build $k failed: $(tail -3 $W/build_$k.log)" ) &
done
wait
for k in "${!V[@]}"; do
  [ -f "$W/probe_$k.so" ] || continue
  for op in fail fail_index; do
    $PY -X faulthandler -c "
import torch
torch.ops.load_library('$W/probe_$k.so')
try:
    torch.ops.segprobe.$op(torch.zeros(1)); print('NO ERROR')
except Exception as e:
    print('caught', type(e).__name__, str(e).splitlines()[0][:50])
" > "$W/run_${k}_$op.log" 2>&1
    echo "variant $k $op: rc=$? $(head -1 "$W/run_${k}_$op.log")"
  done
  so="$W/probe_$k.so"
  echo "  NEEDED: $(readelf -d "$so" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')"
  echo "  defines: $(nm --defined-only "$so" 2>/dev/null | grep -oE ' [TtWw] (__cxa_throw|__gxx_personality_v0|_Unwind_RaiseException)$' | sort -u | tr '\n' ' ')"
done
$PY -c "
import torch, re
libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if re.search(r'stdc\+\+|gcc_s|gomp', l)})
print('process after import torch:', *libs, sep='\n    ')"
if [ "${1:-}" = "--segops" ]; then
  # segops' CPU-only build three ways, in parallel copies of the tree: as configured (CXX from the
  # environment), with the system compiler, and with libstdc++ linked explicitly.
  declare -A S=([asis]="" [syscxx]="CXX=/usr/bin/g++ CC=/usr/bin/gcc" [lstdcxx]="SEGOPS_LDFLAGS=-lstdc++")
  for k in "${!S[@]}"; do
    rm -rf "$W/$k"; mkdir -p "$W/$k"; cp -r setup.py csrc segops "$W/$k/"; rm -f "$W/$k"/segops/_C*.so
    ( cd "$W/$k" && env ${S[$k]} SEGOPS_CUDA=0 MAX_JOBS=6 timeout 200 $PY setup.py -q build_ext --inplace \
        > "$W/segops_build_$k.log" 2>&1 || echo "segops build $k failed: $(tail -3 "$W/segops_build_$k.log")" ) &
  done
  wait
  for k in "${!S[@]}"; do
    ( cd "$W/$k" && $PY -X faulthandler -c "
import segops, torch
x = torch.randn(1, 3, 2, 2); t = torch.zeros(1, 2, 2, dtype=torch.long); t[0, 0, 0] = 7
try:
    segops.ops.partial_cross_entropy(x, t); print('NO ERROR')
except Exception as e:
    print('caught', type(e).__name__, str(e).splitlines()[0][:50])" > "$W/segops_run_$k.log" 2>&1 )
    echo "segops $k: rc=$? $(head -1 "$W/segops_run_$k.log")"
    so=$(ls "$W/$k"/segops/_C*.so 2>/dev/null | head -1); [ -n "$so" ] || continue
    echo "  NEEDED: $(readelf -d "$so" | grep NEEDED | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')"
    echo "  defines: $(nm --defined-only "$so" 2>/dev/null | grep -oE ' [TtWw] (__cxa_throw|__gxx_personality_v0|_Unwind_RaiseException)$' | sort -u | tr '\n' ' ')"
  done
fi
