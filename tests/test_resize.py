"""The CRF losses' half-resolution resize op (segops::_half_resolution and its backward) and the huge-page
outputs of the CPU ops: against segops.reference (ATen's bilinear resize at scale 0.5), autograd, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import segops
from segops import reference
from segops.ops.resize import half_resolution

from conftest import DEVICES

ops = torch.ops.segops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tolerance(dtype: torch.dtype, x: torch.Tensor) -> dict:
    # Each output is 0.25 * ((a + b) + (c + d)) in the accumulation type (float32 for half / bfloat16); ATen's
    # kernel may add the four in another order (its odd-size path goes by columns first): three additions, so
    # at most ~2 ulps of max|x| apart, plus one rounding to the output dtype for half / bfloat16.
    eps = torch.finfo(dtype).eps
    scale = float(x.detach().abs().max()) if x.numel() else 0.0
    return dict(rtol=0.0, atol=2 * eps * scale)


def case(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (1, 4, 7, 9), (2, 1, 2, 3), (1, 21, 65, 64)])
def test_matches_reference_forward_and_backward(device, dtype, shape):
    x = case(shape, dtype, device, seed=1).requires_grad_()
    y, r = half_resolution(x), reference.half_resolution(x)
    assert y.shape == r.shape and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y, r, **tolerance(dtype, x))
    g = case(y.shape, dtype, device, seed=2)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(r, x, g)
    # the gradient is 0.25 * g (exact: a power of two) in each 2x2 block and 0 on a trailing odd row / column
    assert torch.equal(gx, gr)


def _isa_outputs(cases):
    out = []
    for x, g in cases:
        out += [ops._half_resolution(x), ops._half_resolution_backward(g, list(x.shape[2:]))]
    return out


def test_avx2_rows_same_bits_as_portable(tmp_path):
    """The CPU runs the rows in an AVX2 clone where it can (the forward's column pairs split into lanes by
    shuffles); the portable build (ATEN_CPU_CAPABILITY=default, read once per process: so in a subprocess) adds
    and multiplies in the same order: bitwise equal, every dtype, even and odd sizes, one and several rows per
    vector."""
    import os
    import subprocess
    import sys

    cases = []
    for i, (shape, dtype) in enumerate([((1, 21, 64, 64), torch.float32), ((2, 3, 37, 53), torch.float32),
                                        ((1, 2, 9, 40), torch.float64), ((1, 3, 33, 34), torch.float16),
                                        ((1, 3, 18, 35), torch.bfloat16)]):
        x = case(shape, dtype, "cpu", seed=10 + i)
        cases.append((x, case(x.shape[:2] + (x.shape[2] // 2, x.shape[3] // 2), dtype, "cpu", seed=20 + i)))
    torch.save(cases, tmp_path / "cases.pt")
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, torch; sys.path.insert(0, %r); import test_resize as t; "
            "torch.save(t._isa_outputs(torch.load(%r)), %r)"
            % (here, str(tmp_path / "cases.pt"), str(tmp_path / "portable.pt")))
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(_isa_outputs(cases), torch.load(tmp_path / "portable.pt")):
        assert a.dtype == b.dtype and torch.equal(a, b)


@given(B=st.integers(0, 3), C=st.integers(0, 4), H=st.integers(2, 11), W=st.integers(2, 11),
       seed=st.integers(0, 2**31 - 1), channels_last=st.booleans())
def test_property_against_reference(B, C, H, W, seed, channels_last):
    x = case((B, C, H, W), torch.float32, "cpu", seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = half_resolution(x)
    assert y.shape == (B, C, H // 2, W // 2)
    if x.numel() == 0:
        return
    torch.testing.assert_close(y, reference.half_resolution(x), **tolerance(torch.float32, x))
    g = case(y.shape, torch.float32, "cpu", seed + 1)
    gx = ops._half_resolution_backward.default(g, [H, W])
    assert gx.shape == x.shape
    # the adjoint identity <half(x), g> = <x, half^T g>: both float32 sums of B C H W / 4 terms, compared in
    # float64 at ~1e-6 relative of the sum of |terms|
    lhs = (y.double() * g.double()).sum()
    rhs = (x.double() * gx.double()).sum()
    scale = (y.double() * g.double()).abs().sum() + 1e-30
    assert abs(float(lhs - rhs)) <= 1e-6 * float(scale)


def test_gradcheck_and_double_backward():
    x = case((2, 2, 5, 6), torch.float64, "cpu", seed=3).requires_grad_()
    assert torch.autograd.gradcheck(half_resolution, (x,))
    assert torch.autograd.gradgradcheck(half_resolution, (x,))


def test_opcheck(device):
    x = case((2, 3, 6, 7), torch.float32, device, seed=4).requires_grad_()
    torch.library.opcheck(ops._half_resolution.default, (x,))
    g = case((2, 3, 3, 3), torch.float32, device, seed=5).requires_grad_()
    torch.library.opcheck(ops._half_resolution_backward.default, (g, [6, 7]))


def test_strided_input_same_values():
    x = case((2, 6, 10, 12), torch.float32, "cpu", seed=6)
    sliced = x[:, ::2]  # not contiguous
    assert torch.equal(half_resolution(sliced), half_resolution(sliced.contiguous()))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: ops._half_resolution.default(torch.zeros(2, 3, 4)), RuntimeError, r"x must be \(B, C, H, W\)"),
    (lambda: ops._half_resolution.default(torch.zeros(1, 1, 4, 4, dtype=torch.int64)), RuntimeError,
     "x must be float32, float64, float16 or bfloat16"),
    (lambda: ops._half_resolution_backward.default(torch.zeros(1, 1, 2, 2), [5, 6]), RuntimeError,
     r"grad must be \(B, C, H / 2, W / 2\)"),
    (lambda: ops._half_resolution_backward.default(torch.zeros(1, 2, 2), [4, 4]), RuntimeError,
     r"grad must be \(B, C, H / 2, W / 2\)"),
])
def test_errors_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    x = case((2, 5, 33, 30), dtype, "cpu", seed=7).requires_grad_()
    xc = x.detach().cuda().requires_grad_()
    y, yc = half_resolution(x), half_resolution(xc)
    assert torch.equal(y, yc.cpu())  # the same additions in the same order on both devices
    g = case(y.shape, dtype, "cpu", seed=8)
    (gx,) = torch.autograd.grad(y, x, g)
    (gxc,) = torch.autograd.grad(yc, xc, g.cuda())
    assert torch.equal(gx, gxc.cpu())


# ---- large CPU outputs: huge-page allocations (segops/cpu_alloc.h) -------------------------------------------


@pytest.mark.parametrize("huge_pages", ["1", "0"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_outputs_have_the_usual_layout_and_values(channels_last, huge_pages, monkeypatch):
    # 2 x 21 x 256 x 256 float32 = 11 MB: above the 2 MiB from which outputs sit on huge pages (unless
    # SEGOPS_HUGE_PAGES=0, which is read at each allocation)
    monkeypatch.setenv("SEGOPS_HUGE_PAGES", huge_pages)
    from segops.ops import partial_cross_entropy

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 21, 256, 256, generator=g)
    if channels_last:
        logits = logits.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 21, (2, 256, 256), generator=g)
    x = logits.clone().requires_grad_()
    partial_cross_entropy(x, target).backward()
    # the gradient's strides follow the logits' layout, as empty_like's would
    assert x.grad.stride() == logits.stride()
    r = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(r, target).backward()
    # float32 softmax minus one-hot over 131072 pixels: the mean's 1/N scaling makes entries ~1e-6; compared at
    # float32's epsilon of the largest entry
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-5, atol=1e-5 * float(r.grad.abs().max()))
    ones = torch.ones(1, 21, 512, 512, requires_grad=True)  # 22 MB in, 22 MB of gradient out
    y = half_resolution(ones)
    assert y.is_contiguous() and torch.equal(y, torch.ones_like(y))
    (gx,) = torch.autograd.grad(y, ones, torch.ones_like(y))
    assert gx.is_contiguous() and torch.equal(gx, torch.full_like(gx, 0.25))


# ---- the cache of freed large CPU blocks (segops/cpu_alloc.h, segops.memory) ---------------------------------

# (1, 21, 640, 640) float32 in -> (1, 21, 320, 320) out: 8.6 MB, above the 2 MiB from which outputs sit on huge pages;
# its block is 10 MiB (a whole number of 2 MiB pages)
BIG_IN, BLOCK = (1, 21, 640, 640), 10 << 20


@pytest.fixture
def block_cache(monkeypatch):
    monkeypatch.setenv("SEGOPS_HUGE_PAGES", "1")
    monkeypatch.setenv("SEGOPS_CPU_BLOCK_CACHE_MB", "256")
    segops.empty_cpu_cache()
    yield monkeypatch
    segops.empty_cpu_cache()


def test_freed_large_outputs_are_reused_and_fully_rewritten(block_cache):
    a, b = case(BIG_IN, torch.float32, "cpu", seed=11), case(BIG_IN, torch.float32, "cpu", seed=12)
    y = half_resolution(a)
    first = y.data_ptr()
    torch.testing.assert_close(y, F.interpolate(a, scale_factor=0.5, mode="bilinear"), rtol=1e-6, atol=1e-6)
    assert segops.cpu_cached_bytes() == 0  # in use: not in the cache
    del y
    assert segops.cpu_cached_bytes() == BLOCK
    y = half_resolution(b)  # the same size: the freed block again
    assert y.data_ptr() == first and segops.cpu_cached_bytes() == 0
    # every element rewritten: nothing of a's result shows through (the mean of 4 float32 values; the tolerance
    # as above, ~4 roundings of values below 3 in magnitude)
    torch.testing.assert_close(y, F.interpolate(b, scale_factor=0.5, mode="bilinear"), rtol=1e-6, atol=1e-6)
    other = half_resolution(case((1, 21, 800, 800), torch.float32, "cpu", seed=13))  # 13.4 MB: a 14 MiB block
    assert other.data_ptr() != first
    del y, other
    assert segops.cpu_cached_bytes() == BLOCK + (14 << 20)
    segops.empty_cpu_cache()
    assert segops.cpu_cached_bytes() == 0


def test_block_cache_limit(block_cache):
    a = case(BIG_IN, torch.float32, "cpu", seed=14)
    block_cache.setenv("SEGOPS_CPU_BLOCK_CACHE_MB", "0")  # nothing kept
    y = half_resolution(a)
    del y
    assert segops.cpu_cached_bytes() == 0
    block_cache.setenv("SEGOPS_CPU_BLOCK_CACHE_MB", "25")  # room for two 10 MiB blocks, not three
    ys = [half_resolution(a) for _ in range(3)]
    assert len({y.data_ptr() for y in ys}) == 3
    del ys
    assert segops.cpu_cached_bytes() == 2 * BLOCK
    block_cache.setenv("SEGOPS_CPU_BLOCK_CACHE_MB", "5")  # a block larger than the limit is not kept either
    y = half_resolution(a)  # (takes one of the two cached blocks)
    del y
    assert segops.cpu_cached_bytes() == 0  # the freed block and the one left over exceed 5 MiB: both released


def test_block_cache_from_several_threads(block_cache):
    # four Python threads allocating and freeing outputs of two sizes at once (the ops release the GIL): every
    # result must be its own input's
    import threading

    inputs = [case(BIG_IN if i % 2 else (1, 21, 800, 800), torch.float32, "cpu", seed=20 + i) for i in range(4)]
    expect = [F.interpolate(x, scale_factor=0.5, mode="bilinear") for x in inputs]
    failures = []

    def work(i):
        for _ in range(6):
            y = half_resolution(inputs[i])
            if not torch.allclose(y, expect[i], rtol=1e-6, atol=1e-6):  # as above
                failures.append(i)
            del y  # (so that a thread holds one output at a time)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert segops.cpu_cached_bytes() <= 2 * BLOCK + 2 * (14 << 20)  # at most the four outputs' blocks
