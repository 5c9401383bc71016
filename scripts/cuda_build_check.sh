#!/usr/bin/env bash
# CUDA compile + link check on a machine without a GPU: builds segops with SEGOPS_CUDA=1 for sm_90 against the
# CUDA build of torch (torch==2.14.1, whose CUDA 13.0 matches the local nvcc) in its own venv, unpacks that
# wheel into a folder of its own (so several checkouts can share one venv: SEGOPS_CUDA_VENV) and runs the CPU
# test suite against it from outside the source tree (importing a CUDA-built segops where no GPU exists must work).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${SEGOPS_CUDA_VENV:-$repo/.venv-cuda}
stage=${TMPDIR:-/tmp}/segops-cuda-build-$(echo "$repo" | md5sum | cut -c1-8)
# Scratch (~230 MB): removed on exit so repeated runs do not fill the disk; SEGOPS_KEEP_STAGE=1 keeps it.
[ -n "${SEGOPS_KEEP_STAGE:-}" ] || trap 'rm -rf "$stage"' EXIT
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

if ! command -v nvcc >/dev/null && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build_check: no nvcc found (CUDA_HOME=$CUDA_HOME)" >&2; exit 1
fi
test -x "$venv/bin/python" || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  # The CUDA build of torch and its nvidia-* wheels take ~5.5 GB once installed; say so before pip fails halfway.
  free_mb=$(df -Pm "$(dirname "$venv")" | awk 'NR==2 {print $4}')
  if [ "$free_mb" -lt 6500 ]; then
    echo "cuda_build_check: the CUDA build of torch needs ~6.5 GB free next to $venv; only $free_mb MB are" >&2
    exit 1
  fi
  # --no-cache-dir: a cached copy of the multi-GB wheels would only double the disk this step needs.
  "$venv/bin/python" -m pip install -q --no-cache-dir torch==2.14.1
fi
"$venv/bin/python" -m pip install -q ninja setuptools wheel pytest hypothesis expecttest numpy pillow tqdm pyyaml

bash scripts/stage_tree.sh "$stage"
t0=$(date +%s)
(cd "$stage" && SEGOPS_CUDA=1 "$venv/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$stage/dist" .)
echo "cuda_build_check: CUDA build + link for sm_${TORCH_CUDA_ARCH_LIST/./} took $(( $(date +%s) - t0 )) s"
rm -rf "$stage/site"
"$venv/bin/python" -m pip install -q --no-deps --target "$stage/site" "$stage"/dist/segops-*.whl
export PYTHONPATH="$stage/site"

cd "${TMPDIR:-/tmp}"
"$venv/bin/python" - <<'PY'
import segops, torch
d = segops.info()
assert d["cuda_kernels_compiled"], d
assert "sm_90" in d["cuda_archs"], d
import os
assert segops.__file__.startswith(os.environ["PYTHONPATH"]), segops.__file__
print("cuda_build_check: segops", d["segops"], "torch", d["torch"], "CUDA kernels for", d["cuda_archs"], "- imported from", segops.__file__)
PY
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider "$repo/tests"
