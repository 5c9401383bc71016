#!/usr/bin/env bash
# How users install segops into their own projects: build a wheel, install it into a fresh venv that has only
# torch, and use the ops from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${SEGOPS_BUILD_PYTHON:-$repo/.venv/bin/python}
tag=$(echo "$repo" | md5sum | cut -c1-8)  # one staging folder per checkout: several may run at once
stage=${TMPDIR:-/tmp}/segops-wheel-build-$tag
fresh=${TMPDIR:-/tmp}/segops-wheel-venv-$tag
# Both folders are scratch (~1.1 GB with torch): left behind, repeated runs fill the disk. SEGOPS_KEEP_STAGE=1 keeps them.
[ -n "${SEGOPS_KEEP_STAGE:-}" ] || trap 'rm -rf "$stage" "$fresh"' EXIT

bash scripts/stage_tree.sh "$stage"
(cd "$stage" && SEGOPS_CUDA=0 "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$stage/dist" .)
rm -rf "$fresh"
python3 -m venv "$fresh"
"$fresh/bin/python" -m pip install -q torch==2.13.0
"$fresh/bin/python" -m pip install -q "$stage"/dist/segops-*.whl
cd "${TMPDIR:-/tmp}"
"$fresh/bin/python" - <<'PY'
import torch, segops
assert "site-packages" in segops.__file__, segops.__file__
logits = torch.randn(2, 21, 16, 16, requires_grad=True)
target = torch.full((2, 16, 16), 255, dtype=torch.long)
target[:, 4:8, 4:8] = 3
loss = segops.ops.partial_cross_entropy(logits, target) + 0.1 * segops.ops.entropy(logits)
loss.backward()
ref = torch.nn.functional.cross_entropy(logits, target, ignore_index=255) + 0.1 * segops.reference.entropy(logits)
torch.testing.assert_close(loss, ref)
print("wheel_smoke: ok, loss", float(loss), "from", segops.__file__)
PY
"$fresh/bin/segops" info
