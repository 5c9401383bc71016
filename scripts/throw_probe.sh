#!/usr/bin/env bash
# Diagnoses "a failing TORCH_CHECK crashes Python" on a machine: builds the CPU-only extension with the default
# flags and without -fvisibility=hidden, and calls an op with a bad label under each build.
cd "$(dirname "$0")/.."
probe='import segops, torch
x = torch.randn(1, 3, 2, 2); t = torch.zeros(1, 2, 2, dtype=torch.long); t[0, 0, 0] = 7
try:
    segops.ops.partial_cross_entropy(x, t)
except Exception as e:
    print("caught", type(e).__name__, str(e).splitlines()[0][:80])'
echo "compilers: $(command -v c++) $(c++ --version | head -1)"; ls /usr/bin/g++* 2>/dev/null
for variant in default novis syscxx; do
  rm -rf build segops/_C*.so
  cp setup.py /tmp/setup.py.orig
  [ $variant = novis ] && sed -i 's/"-fvisibility=hidden", //' setup.py
  env=""; [ $variant = syscxx ] && [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
  SEGOPS_CUDA=0 MAX_JOBS=16 timeout 100 python3 setup.py -q build_ext --inplace > /tmp/build-$variant.log 2>&1 || tail -5 /tmp/build-$variant.log
  cp /tmp/setup.py.orig setup.py
  python3 -c "$probe"; echo "variant=$variant rc=$?"
done
