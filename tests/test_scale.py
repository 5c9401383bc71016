"""Scale: 64-bit offsets (tensors past 2^31 elements), the lattice's per-image size limit, distinct colours.

The >2^31-element tensors are cheap: their storage is an anonymous private mmap, which the kernel hands out
as zero pages on demand, so only the pages a test writes (a few values) or an op writes (its outputs)
cost memory. The ops read the untouched zeros like any other value. scripts/scale_check.py (`make scale`)
runs the losses at 4096 x 4096 with peak-RSS accounting; README, "Scale" has the numbers.
"""

from __future__ import annotations

import math
import mmap

import pytest
import torch

from segops import reference as R
from segops import reference_lattice as RL
from segops.nn import DenseCRFLoss
from segops.ops import entropy, partial_cross_entropy, permutohedral_filter
from segops.ops.lattice import crf_features

ops = torch.ops.segops
INT32_MAX = 2**31 - 1


def lazy_zeros(shape, dtype=torch.float32) -> torch.Tensor:
    """A zero tensor whose pages are only allocated when written (anonymous private mapping)."""
    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(buf, dtype=dtype, count=n).view(shape)
    t._segops_mmap = buf  # keep the mapping alive with the tensor
    return t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ---- partial cross-entropy / entropy: class offsets k * S past 2^31 ---------------------------------------
# (1, K, S) with K = 2^16, S = 2^15 + 1: offset (K-1) S + s > 2^31 for the last class. The labelled pixels
# include a full block of 32 (the blocked CPU path) and isolated ones (the per-pixel path), their logits are
# set in a few classes, the last one among them; everything else is an (untouched) zero.
K_BIG, S_BIG = 2**16, 2**15 + 1


def _big_logits(dtype=torch.float32):
    logits = lazy_zeros((1, K_BIG, S_BIG), dtype)
    target = torch.full((1, S_BIG), 255, dtype=torch.int64)
    pixels = list(range(S_BIG - 33, S_BIG - 1)) + [5, S_BIG - 1]  # the last full block, two stragglers
    g = torch.Generator().manual_seed(0)
    for i, s in enumerate(pixels):
        for k in (0, 7, K_BIG // 2):
            logits[0, k, s] = float(torch.randn((), generator=g)) * 3
        # the last class dominates the softmax (e^12 > 2^16 zeros): misreading it would change every result
        logits[0, K_BIG - 1, s] = 12.0 + float(torch.randn((), generator=g))
        target[0, s] = K_BIG - 1 if i % 4 else 7
    assert (K_BIG - 1) * S_BIG + S_BIG - 1 > INT32_MAX
    return logits, target, pixels


def _column_reference(logits, target, s, reduction="sum"):
    """The reference loss of pixel s alone: F.cross_entropy on its (1, K, 1) column in float64."""
    col = logits[:, :, s:s + 1].double()
    return R.partial_cross_entropy(col, target[:, s:s + 1], ignore_index=255, reduction=reduction)


# float32 accumulation over K = 2^16 classes (the kernels' running sums) against a float64 reference: the
# worst-case bound of a sequential float32 sum of n terms is (n - 1) u ~ 2^16 2^-24 = 3.9e-3 relative
# (observed: ~1e-5 for the loss, ~3e-4 for the entropy); a misread class offset moves the results by O(1)
# (the last class holds most of the softmax mass).
BIG_TOL = 2.0**16 * 2.0**-24


def test_pce_forward_offsets_beyond_int32():
    logits, target, pixels = _big_logits()
    assert logits.numel() > INT32_MAX
    per_pixel = partial_cross_entropy(logits, target, ignore_index=255, reduction="none")
    want = torch.stack([_column_reference(logits, target, s) for s in pixels])
    got = per_pixel[0, pixels]
    assert rel_err(got, want) < BIG_TOL
    mask = torch.ones(S_BIG, dtype=torch.bool)
    mask[pixels] = False
    assert bool((per_pixel[0, mask] == 0).all())  # unlabelled pixels: 0
    mean = partial_cross_entropy(logits, target, ignore_index=255)
    assert abs(float(mean) - float(want.mean())) < BIG_TOL * float(want.abs().max())


def test_entropy_forward_offsets_beyond_int32():
    logits, _, pixels = _big_logits()
    mask = torch.zeros(1, S_BIG, dtype=torch.bool)
    mask[0, pixels] = True
    got = entropy(logits, mask=mask, reduction="none")[0, pixels]
    want = torch.stack([R.entropy(logits[:, :, s:s + 1].double(), reduction="none")[0, 0] for s in pixels])
    assert rel_err(got, want) < BIG_TOL


@pytest.mark.slow
def test_pce_backward_offsets_beyond_int32():
    # The gradient is a dense (1, K, S) tensor: 4.3 GB in bfloat16 (written in full), hence slow / big.
    logits, target, pixels = _big_logits(torch.bfloat16)
    logits.requires_grad_()
    partial_cross_entropy(logits, target, ignore_index=255, reduction="sum").backward()
    grad = logits.grad
    assert grad.shape == logits.shape
    for s in (pixels[0], pixels[-3], pixels[-1]):
        col = logits.detach()[:, :, s:s + 1].double().requires_grad_()
        R.partial_cross_entropy(col, target[:, s:s + 1], ignore_index=255, reduction="sum").backward()
        assert rel_err(grad[:, :, s:s + 1].float(), col.grad) < 1e-2  # bfloat16 gradient: 8 bits
    assert float(grad[0, :, 100].float().abs().sum()) == 0.0  # unlabelled pixel: zero gradient


# ---- the lattice: per-image limit of 2^30 entries, offsets past 2^31 in the values ------------------------


def test_lattice_rejects_more_than_2_30_entries_per_image():
    # N (d+1) >= 2^30 would overflow the int32 entry / slot ids of the hash table: a clear error, before
    # any large allocation (stride-0 inputs: this test costs no memory).
    d = 16
    N = (2**30) // (d + 1) + 1
    values = torch.zeros(1, 1, 1).expand(1, 1, N)
    feats = torch.zeros(1, d, 1).expand(1, d, N)
    with pytest.raises(RuntimeError, match=r"lattice entries, more than the 2\^30 supported per image"):
        permutohedral_filter(values, feats)
    # the same d on a small image works
    small = permutohedral_filter(torch.ones(1, 1, 4), torch.zeros(1, d, 4))
    assert torch.isfinite(small).all()


@pytest.mark.slow
def test_lattice_value_offsets_beyond_int32():
    # values (1, C, N) with C N > 2^31 (bfloat16: the output is written in full, 4.3 GB). All points share
    # one feature vector, so W x = lam * sum_n x[c, n] for every point, with lam from a 2-point case.
    C, N = 2**16, 2**15 + 1
    values = lazy_zeros((1, C, N), torch.bfloat16)
    feats = torch.zeros(1, 2, N)
    hot = [(C - 1, N - 1, 1.5), (C - 1, 3, -2.0), (C // 2, N - 2, 0.75), (0, 0, 1.0)]
    for c, n, v in hot:
        values[0, c, n] = v
    assert (C - 1) * N + N - 1 > INT32_MAX
    out = permutohedral_filter(values, feats)
    lam = float(permutohedral_filter(torch.tensor([[[1.0, 0.0]]]), torch.zeros(1, 2, 2))[0, 0, 0])
    for c in (0, C // 2, C - 1):
        want = lam * sum(v for cc, _, v in hot if cc == c)
        row = out[0, c].float()
        assert float((row - want).abs().max()) <= 1e-2 * abs(want)  # bfloat16 output
    assert float(out[0, 1].float().abs().max()) == 0.0


# ---- distinct colours ------------------------------------------------------------------------------------


def distinct_colour_image(S: int) -> torch.Tensor:
    """(1, 3, S, S) with S^2 <= 2^24 distinct RGB values, shuffled (no two pixels share a colour)."""
    assert S * S <= 2**24
    g = torch.Generator().manual_seed(S)
    codes = torch.randperm(2**24, generator=g)[: S * S]
    rgb = torch.stack([codes // 65536, (codes // 256) % 256, codes % 256]).float()
    return rgb.view(1, 3, S, S)


@pytest.mark.parametrize("sigma_rgb,sigma_xy,isolated", [(0.2, 0.2, True), (15.0, 5.0, False)])
def test_distinct_colours_filter_matches_reference(sigma_rgb, sigma_xy, isolated):
    # Every pixel a different colour. With tiny sigmas every pixel sits on its own d+1 vertices
    # (M = N (d+1): the hash table's worst case, every insert a new key); with ECCV-like sigmas the
    # colours share vertices irregularly. Both must match the pure-PyTorch lattice.
    S = 96
    img = distinct_colour_image(S)
    codes = (img[0, 0] * 65536 + img[0, 1] * 256 + img[0, 2]).long()
    assert torch.unique(codes).numel() == S * S
    f = crf_features(img, sigma_rgb, sigma_xy)
    v = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    out = ops.permutohedral_filter.default(v, f, False)
    M = out[3].shape[0]
    if isolated:
        assert M == S * S * 6
    else:
        assert S * S < M < S * S * 6
    assert rel_err(out[0], RL.permutohedral_filter(v, f)) < 2e-5
    # the gradient (W^T) on the same lattice
    vv = v.clone().requires_grad_()
    gout = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(2))
    permutohedral_filter(vv, f).backward(gout)
    vr = v.clone().requires_grad_()
    RL.permutohedral_filter(vr, f).backward(gout)
    assert rel_err(vv.grad, vr.grad) < 2e-5


def test_distinct_colours_dense_crf_loss_matches_reference():
    S = 64
    img = distinct_colour_image(S)
    img = torch.cat([img, img.flip(-1)])
    seg = torch.softmax(torch.randn(2, 5, S, S, generator=torch.Generator().manual_seed(3)), 1)
    a = seg.clone().requires_grad_()
    loss = DenseCRFLoss(2e-9, 15.0, 8.0)(img, a)
    loss.backward()
    want = RL.dense_crf_loss(img, seg, 2e-9, 15.0, 8.0)
    assert abs(float(loss.detach()) - float(want)) < 1e-5 * abs(float(want))
    # The module's gradient is the ECCV'18 one, -(2 w / B) W X (reference lattice on the same features);
    # autograd of the reference would give -(w / B) (W + W^T) X, which the lattice's asymmetry moves by
    # up to ~10% on random colours.
    wx = RL.permutohedral_filter(seg, crf_features(img, 15.0, 8.0))
    assert rel_err(a.grad, -(2 * 2e-9 / 2) * wx) < 2e-5


# ---- the CRF energy's reduction --------------------------------------------------------------------------


def test_crf_energy_reduction_accurate_for_many_terms():
    # Regression: the energy <X, W X> was once one float32 BLAS dot over B x K x H x W elements, ~2e-3 off at
    # 4096 x 4096 x 21 (found by scripts/scale_check.py: loss vs <X, grad> / 2). It is now summed over the
    # lattice's vertices in float64. Here every point has its own d+1 vertices (tiny sigmas, distinct colours),
    # so the sum runs over M K = 6 * 2^17 * 21 = 16.5M terms, against the same form evaluated per pixel from the
    # float32 W X: each side carries only the float32 rounding of the splatted / filtered values (~1e-7
    # relative per term, averaging out); a float32 running sum of 2^24 terms drifts by ~1e-4 or more.
    S = 2**9
    g = torch.Generator().manual_seed(0)
    codes = torch.randperm(2**24, generator=g)[: S * S // 2]
    rgb = torch.stack([codes // 65536, (codes // 256) % 256, codes % 256]).float().view(1, 3, S // 2, S)
    feats = crf_features(rgb, 0.2, 0.2)
    x = torch.rand(1, 21, S // 2, S, generator=g)
    vertex, bary, neighbors = ops.permutohedral_lattice.default(feats)
    assert neighbors.shape[0] == 6 * (S * S // 2)  # isolated points: the longest vertex sum
    forms = ops._lattice_quadratic_forms.default(x, None, vertex, bary, neighbors, False, False)[0]
    wx = ops.permutohedral_apply.default(x, vertex, bary, neighbors, False)
    want = (x.double() * wx.double()).sum((2, 3))
    assert rel_err(forms[..., 0], want) < 1e-5


# ---- out of memory: a clear error, and the process goes on ------------------------------------------------

_OOM_CHILD = r"""
import resource, sys
import torch, segops
from segops.ops import permutohedral_filter
from segops.ops.lattice import crf_features
from segops import reference_lattice as RL
vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
limit = vm + (1 << 30)  # 1 GiB of address space beyond what torch + segops already map
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
S = 1536  # distinct colours, tiny sigmas: 6 S^2 = 14M lattice vertices, ~2.5 GB of lattice
yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing='ij')
img = torch.stack([xx % 256, yy % 256, (xx // 256) + 16 * (yy // 256)]).float().unsqueeze(0)
f = crf_features(img, 0.1, 0.1)
v = torch.rand(1, 1, S, S)
try:
    permutohedral_filter(v, f)
except RuntimeError as e:
    print('ERROR:', str(e).splitlines()[0])
else:
    print('NO ERROR')
# the process is intact: a small filter still matches the reference
g = torch.Generator().manual_seed(0)
fs, vs = torch.rand(1, 5, 16, 16, generator=g) * 4, torch.rand(1, 2, 16, 16, generator=g)
err = float((permutohedral_filter(vs, fs) - RL.permutohedral_filter(vs, fs)).abs().max())
print('AFTER', err)
"""


def test_lattice_out_of_memory_is_a_clear_error():
    # A lattice that does not fit (address space limited to 1 GiB beyond the bare process) raises torch's
    # allocator error instead of crashing, and the process keeps working.
    import os
    import subprocess
    import sys

    if any(s in os.environ.get("LD_PRELOAD", "") for s in ("asan", "tsan")):
        pytest.skip("address-space limits are meaningless under a sanitizer (terabytes of shadow mappings)")
    r = subprocess.run([sys.executable, "-c", _OOM_CHILD], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(l.startswith("ERROR:") and "memory" in l for l in lines), r.stdout
    after = [float(l.split()[1]) for l in lines if l.startswith("AFTER")]
    assert after and after[0] < 1e-5
