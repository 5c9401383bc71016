"""Tests of atrous_conv2d / conv_transpose2d, their modules and the bilinear initialiser."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

import segops
from segops import ops, reference
from segops.nn import AtrousConv2d, ConvTranspose2d
from segops.nn.init import bilinear_, bilinear_kernel_1d
from segops.ops.conv import conv_output_size, conv_transpose_output_size

from conftest import HAS_CUDA

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g, dtype=D64, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=D64) * scale).to(dtype=dtype, device=device)


def _grads(fn, tensors, gout):
    out = fn(*tensors)
    gs = torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], gout)
    return out, gs


def _leaf(t):
    return t.detach().clone().requires_grad_()


# ---- the lecture's worked example and the zero-insertion equivalence -------------------------------------------------


def _scatter_transpose(x, k, stride, padding):
    """Transposed conv written as the textbook scatter: each input pixel stamps input * kernel onto the output."""
    H, W = len(x), len(x[0])
    kh, kw = len(k), len(k[0])
    full_h, full_w = (H - 1) * stride + kh, (W - 1) * stride + kw
    full = [[0.0] * full_w for _ in range(full_h)]
    for i in range(H):
        for j in range(W):
            for a in range(kh):
                for b in range(kw):
                    full[i * stride + a][j * stride + b] += x[i][j] * k[a][b]
    return [row[padding:full_w - padding] for row in full[padding:full_h - padding]]


def test_lecture_worked_example():
    # Lecture "Transpose Convolution: Example": 4x4 input 0..15, bilinear-like 3x3 kernel, stride 2, padding 1.
    x = [[float(4 * i + j) for j in range(4)] for i in range(4)]
    k = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    expected = torch.tensor(_scatter_transpose(x, k, 2, 1), dtype=D64)
    assert expected.shape == (7, 7)
    out = ops.conv_transpose2d(torch.tensor(x, dtype=D64)[None, None], torch.tensor(k, dtype=D64)[None, None],
                               stride=2, padding=1)
    assert out.shape == (1, 1, 7, 7)
    # exact: small integers times dyadic weights (0.25, 0.5, 1) are exact in float64, in any summation order
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=0)
    # This kernel is the odd-size bilinear filter: the stride-2 result interpolates between the input samples,
    # so the input pixels reappear unchanged at even positions and midpoints sit in between.
    torch.testing.assert_close(out[0, 0, ::2, ::2], torch.tensor(x, dtype=D64)[:, :], rtol=0, atol=0)  # exact, as above
    # default float64 tolerance (rtol 1e-7): the value 2.5 is exact; the check is about geometry, not rounding
    torch.testing.assert_close(out[0, 0, 1, 1], torch.tensor((0.0 + 1 + 4 + 5) / 4, dtype=D64))


@pytest.mark.parametrize("stride,padding,dilation,k", [(2, 1, 1, 3), (3, 0, 1, 2), (2, 2, 2, 3), (1, 1, 1, 3)])
def test_transpose_is_zero_insertion_then_flipped_conv(stride, padding, dilation, k):
    g = _gen(1)
    x = _rand(2, 3, 5, 4, g=g)
    w = _rand(3, 4, k, k, g=g)  # (C_in, C_out, k, k)
    # zero insertion: stride-1 gaps between the input pixels
    z = x.new_zeros(2, 3, (5 - 1) * stride + 1, (4 - 1) * stride + 1)
    z[:, :, ::stride, ::stride] = x
    flipped = w.flip(2, 3).transpose(0, 1)  # (C_out, C_in, k, k), kernel rotated by 180 degrees
    q = dilation * (k - 1) - padding
    assert q >= 0
    expected = F.conv2d(z, flipped, padding=q, dilation=dilation)
    out = ops.conv_transpose2d(x, w, stride=stride, padding=padding, dilation=dilation)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): both sides sum 3 * 9 = 27 products of O(1) terms, rounding
    # error ~1e-15
    torch.testing.assert_close(out, expected)


# ---- against torch, random geometry -------------------------------------------------------------------------------------


@st.composite
def _geometry(draw, transposed: bool):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = draw(st.booleans()) and groups > 1
    cig = 1 if depthwise else draw(st.integers(1, 3))
    cog = 1 if depthwise else draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    n = draw(st.integers(1, 2))
    if transposed:
        h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
        oph = draw(st.integers(0, max(sh, dh) - 1))
        opw = draw(st.integers(0, max(sw, dw) - 1))
        ho = conv_transpose_output_size(h, kh, sh, ph, oph, dh)
        wo = conv_transpose_output_size(w, kw, sw, pw, opw, dw)
        if ho < 1 or wo < 1:
            ph = pw = 0
        return dict(n=n, groups=groups, cig=cig, cog=cog, k=(kh, kw), s=(sh, sw), p=(ph, pw), d=(dh, dw),
                    op=(oph, opw), hw=(h, w))
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 12))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 12))
    return dict(n=n, groups=groups, cig=cig, cog=cog, k=(kh, kw), s=(sh, sw), p=(ph, pw), d=(dh, dw), hw=(h, w))


@given(_geometry(transposed=False), st.integers(0, 2**31 - 1), st.booleans())
def test_atrous_matches_torch(geo, seed, with_bias):
    g = _gen(seed)
    G = geo["groups"]
    x = _leaf(_rand(geo["n"], geo["cig"] * G, *geo["hw"], g=g))
    w = _leaf(_rand(geo["cog"] * G, geo["cig"], *geo["k"], g=g))
    b = _leaf(_rand(geo["cog"] * G, g=g)) if with_bias else None
    args = (geo["s"], geo["p"], geo["d"], G)
    ref = reference.atrous_conv2d(x, w, b, *args)
    gout = _rand(*ref.shape, g=g)
    out, grads = _grads(lambda *t: ops.atrous_conv2d(*t, *args), (x, w, b), gout)
    ref, rgrads = _grads(lambda *t: reference.atrous_conv2d(*t, *args), (x, w, b), gout)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): outputs sum at most 3 * 4 * 4 = 48 products, gradients at
    # most 2 * 12 * 12 = 288, of O(1) terms: rounding error ~1e-14
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)


@given(_geometry(transposed=True), st.integers(0, 2**31 - 1), st.booleans())
def test_transpose_matches_torch(geo, seed, with_bias):
    g = _gen(seed)
    G = geo["groups"]
    x = _leaf(_rand(geo["n"], geo["cig"] * G, *geo["hw"], g=g))
    w = _leaf(_rand(geo["cig"] * G, geo["cog"], *geo["k"], g=g))
    b = _leaf(_rand(geo["cog"] * G, g=g)) if with_bias else None
    args = (geo["s"], geo["p"], geo["op"], G, geo["d"])
    ho = conv_transpose_output_size(geo["hw"][0], geo["k"][0], geo["s"][0], geo["p"][0], geo["op"][0], geo["d"][0])
    wo = conv_transpose_output_size(geo["hw"][1], geo["k"][1], geo["s"][1], geo["p"][1], geo["op"][1], geo["d"][1])
    if ho < 1 or wo < 1:
        with pytest.raises(RuntimeError, match="output size"):
            ops.conv_transpose2d(x, w, b, *args)
        return
    ref = reference.conv_transpose2d(x, w, b, *args)
    gout = _rand(*ref.shape, g=g)
    out, grads = _grads(lambda *t: ops.conv_transpose2d(*t, *args), (x, w, b), gout)
    ref, rgrads = _grads(lambda *t: reference.conv_transpose2d(*t, *args), (x, w, b), gout)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): at most 3 * 4 * 4 = 48 (gradients: a few hundred) products
    # of O(1) terms per sum: rounding error ~1e-14
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)


@given(_geometry(transposed=False), st.integers(0, 2**31 - 1))
def test_adjoint_identity(geo, seed):
    # <atrous(x), y> = <x, conv_transpose(y)> with the same weight; output_padding restores x's size.
    g = _gen(seed)
    G = geo["groups"]
    x = _rand(geo["n"], geo["cig"] * G, *geo["hw"], g=g)
    w = _rand(geo["cog"] * G, geo["cig"], *geo["k"], g=g)
    y = ops.atrous_conv2d(x, w, None, geo["s"], geo["p"], geo["d"], G)
    v = _rand(*y.shape, g=g)
    op = [geo["hw"][i] - conv_transpose_output_size(y.shape[2 + i], geo["k"][i], geo["s"][i], geo["p"][i], 0,
                                                    geo["d"][i]) for i in range(2)]
    assert all(0 <= o < geo["s"][i] for i, o in enumerate(op))
    xt = ops.conv_transpose2d(v, w, None, geo["s"], geo["p"], op, G, geo["d"])
    assert xt.shape == x.shape
    # float64: both sides are sums of a few thousand products of O(1) terms (error ~1e-13 relative); rtol 1e-12
    torch.testing.assert_close((y * v).sum(), (x * xt).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gradcheck(groups):
    g = _gen(3)
    x = _leaf(_rand(2, 4, 6, 5, g=g))
    w = _leaf(_rand(4, 4 // groups, 3, 2, g=g))
    b = _leaf(_rand(4, g=g))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.atrous_conv2d(x, w, b, (2, 1), (2, 1), (2, 3), groups),
                                    (x, w, b))
    wt = _leaf(_rand(4, 4 // groups, 3, 2, g=g))
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.conv_transpose2d(x, w, b, (2, 3), (1, 0), (1, 0), groups, (2, 1)), (x, wt, b))


def test_opcheck():
    g = _gen(4)
    for groups, dw in [(1, False), (2, False), (4, True)]:
        x = _rand(2, 4, 7, 6, g=g, dtype=torch.float32).requires_grad_()
        w = _rand(4, 1 if dw else 4 // groups, 3, 3, g=g, dtype=torch.float32).requires_grad_()
        b = _rand(4, g=g, dtype=torch.float32).requires_grad_()
        torch.library.opcheck(torch.ops.segops.atrous_conv2d.default, (x, w, b, [1, 2], [2, 1], [2, 1], groups))
        torch.library.opcheck(torch.ops.segops.conv_transpose2d.default,
                              (x, w, b, [2, 1], [1, 1], [1, 0], groups, [1, 2]))
        y = ops.atrous_conv2d(x, w, b, [1, 2], [2, 1], [2, 1], groups).detach()
        torch.library.opcheck(torch.ops.segops._atrous_conv2d_backward.default,
                              (torch.randn_like(y), x.detach(), w.detach(), [1, 2], [2, 1], [2, 1], groups,
                               [True, True, True]))
        torch.library.opcheck(torch.ops.segops._atrous_conv2d_backward.default,
                              (torch.randn_like(y), x.detach(), w.detach(), [1, 2], [2, 1], [2, 1], groups,
                               [True, False, False]))
        t = ops.conv_transpose2d(x, w, b, [2, 1], [1, 1], [1, 0], groups, [1, 2]).detach()
        torch.library.opcheck(torch.ops.segops._conv_transpose2d_backward.default,
                              (torch.randn_like(t), x.detach(), w.detach(), [2, 1], [1, 1], [1, 0], groups, [1, 2],
                               [True, True, True]))


# ---- layouts, dtypes, determinism -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depthwise", [False, True])
def test_channels_last_and_noncontiguous(device, depthwise):
    g = _gen(5)
    C = 6
    base = _rand(2, C, 11, 14, g=g, dtype=D64, device=device)
    w = _rand(C, 1 if depthwise else C, 3, 3, g=g, dtype=D64, device=device)
    groups = C if depthwise else 1
    wt_nc = _rand(3, 3, C, 1 if depthwise else C, g=g, dtype=D64, device=device).permute(2, 3, 0, 1)
    variants = [base.contiguous(memory_format=torch.channels_last), base[:, :, 1::2, ::3], base.transpose(2, 3)]
    for x in variants:
        for weight in (w, wt_nc):
            # default float64 tolerance (rtol 1e-7, atol 1e-7): 6 * 9 = 54 products per output, error ~1e-14
            torch.testing.assert_close(ops.atrous_conv2d(x, weight, None, 1, 2, 2, groups),
                                       F.conv2d(x, weight, None, 1, 2, 2, groups))
            torch.testing.assert_close(ops.conv_transpose2d(x, weight, None, 2, 1, 1, groups),
                                       F.conv_transpose2d(x, weight, None, 2, 1, 1, groups))
        xl, wl = _leaf(x), _leaf(w)
        gi, gw = torch.autograd.grad(ops.conv_transpose2d(xl, wl, None, 2, 1, 1, groups).square().sum(), (xl, wl))
        ri, rw = torch.autograd.grad(F.conv_transpose2d(xl, wl, None, 2, 1, 1, groups).square().sum(), (xl, wl))
        # default float64 tolerance: input gradients sum 54 products, weight gradients 2 * 11 * 14 = 308: ~1e-13
        torch.testing.assert_close(gi, ri)
        torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("depthwise", [False, True])
def test_half_precision_float_accumulation(device, dtype, depthwise):
    # segops' kernels compute in float32 and round once: the result equals the exact (float64) result of the same
    # (rounded) inputs, rounded to `dtype`, up to one rounding step (rtol = the dtype's epsilon) plus float32
    # accumulation-order noise (atol). backend="segops": "auto" gives these small CUDA convolutions to cuDNN, whose
    # float32 reference would also use TF32 (cudnn.allow_tf32 is on by default) -- 2^-11 relative, above the bound.
    g = _gen(6)
    C = 8
    groups = C if depthwise else 2
    x = _rand(2, C, 9, 10, g=g, dtype=dtype, device=device)
    w = _rand(C, C // groups, 3, 3, g=g, dtype=dtype, device=device, scale=0.3)
    b = _rand(C, g=g, dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    for ours, theirs in [
        (ops.atrous_conv2d(x, w, b, 1, 2, 2, groups, backend="segops"),
         F.conv2d(x.double(), w.double(), b.double(), 1, 2, 2, groups)),
        (ops.conv_transpose2d(x, w, b, 2, 1, 1, groups, backend="segops"),
         F.conv_transpose2d(x.double(), w.double(), b.double(), 2, 1, 1, groups)),
    ]:
        assert ours.dtype == dtype
        # one rounding to `dtype` (rtol eps) after float32 sums of 4 * 9 = 36 products (atol 1e-5: float32 noise)
        torch.testing.assert_close(ours.double(), theirs, rtol=eps, atol=1e-5)
    xl, wl = _leaf(x), _leaf(w)
    gi, gw = torch.autograd.grad(ops.atrous_conv2d(xl, wl, None, 1, 2, 2, groups, backend="segops").float().sum(),
                                 (xl, wl))
    xf, wf = _leaf(x.double()), _leaf(w.double())
    ri, rw = torch.autograd.grad(F.conv2d(xf, wf, None, 1, 2, 2, groups).sum(), (xf, wf))
    assert gi.dtype == dtype and gw.dtype == dtype
    # gradients: one rounding (eps) after float32 sums of up to 2 * 9 * 10 = 180 products of O(1): atol 1e-4
    torch.testing.assert_close(gi.double(), ri, rtol=eps, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=eps, atol=1e-4)


@pytest.mark.parametrize("depthwise", [False, True])
def test_backward_bit_identical_across_runs(device, depthwise):
    # segops' kernels accumulate in a fixed order. backend="segops": "auto" gives most CUDA convolutions to cuDNN,
    # whose default backward algorithms are not deterministic (as in PyTorch, unless deterministic mode is on).
    g = _gen(7)
    C = 16
    groups = C if depthwise else 1
    x = _rand(3, C, 40, 37, g=g, dtype=torch.float32, device=device).requires_grad_()
    w = _rand(C, C // groups, 3, 3, g=g, dtype=torch.float32, device=device).requires_grad_()
    wt = _rand(C, C // groups, 4, 4, g=g, dtype=torch.float32, device=device).requires_grad_()
    runs = []
    for _ in range(3):
        a = ops.atrous_conv2d(x, w, None, 1, 4, 4, groups, backend="segops")
        t = ops.conv_transpose2d(x, wt, None, 2, 1, 0, groups, backend="segops")
        runs.append(torch.autograd.grad(a.square().sum() + t.square().sum(), (x, w, wt)))
    for other in runs[1:]:
        for r0, r1 in zip(runs[0], other):
            assert torch.equal(r0, r1)


@pytest.mark.parametrize("groups", [1, 2])
def test_large_maps_use_row_blocks(groups):
    # Big enough that the CPU streams im2col by blocks of output rows (Cig*K*Wo*rows > 2^21) and handles one
    # sample at a time; the GPU batches the samples instead. Both must equal torch.
    g = _gen(13)
    x = _leaf(_rand(2, 64 * groups, 90, 64, g=g))
    w = _leaf(_rand(4 * groups, 64, 3, 3, g=g, scale=0.1))
    b = _leaf(_rand(4 * groups, g=g))
    args = (1, 3, 3, groups)
    ref = F.conv2d(x, w, b, *args)
    gout = _rand(*ref.shape, g=g)
    out, grads = _grads(lambda *t: ops.atrous_conv2d(*t, *args), (x, w, b), gout)
    ref, rgrads = _grads(lambda *t: F.conv2d(*t, *args), (x, w, b), gout)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): outputs sum 64 * 9 = 576 products, weight gradients
    # 2 * 90 * 64 = 11520, of O(0.1-1) terms: rounding error ~1e-12, far inside
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("k,s,p,op", [(9, 3, 2, 1), (16, 8, 4, 0), (12, 5, 0, 4), (8, 1, 3, 0)])
def test_depthwise_wide_kernels(device, k, s, p, op):
    # kernels of width >= 8 take the contiguous-run loops of the depthwise kernels (upsampling filters)
    g = _gen(14)
    C = 3
    x = _leaf(_rand(2, C, 5, 7, g=g, device=device))
    w = _leaf(_rand(C, 1, k, k - 1, g=g, device=device))
    b = _leaf(_rand(C, g=g, device=device))
    args = ((s, s), (p, p), (op, op), C)
    ref = F.conv_transpose2d(x, w, b, *args)
    gout = _rand(*ref.shape, g=g, device=device)
    out, grads = _grads(lambda *t: ops.conv_transpose2d(*t, *args), (x, w, b), gout)
    ref, rgrads = _grads(lambda *t: F.conv_transpose2d(*t, *args), (x, w, b), gout)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): at most 16 * 15 / s^2 products per output, a few thousand
    # per weight gradient, of O(1) terms: rounding error ~1e-12
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)


def test_empty_batch():
    x = torch.zeros(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    out = ops.atrous_conv2d(x, w, None, 1, 1)
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    assert ops.conv_transpose2d(x, w, None, 2).shape == (0, 4, 11, 11)


def test_unbatched_input():
    g = _gen(8)
    x = _rand(3, 6, 6, g=g)
    w = _rand(3, 3, 3, 3, g=g)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): 3 * 9 = 27 products per output, error ~1e-15
    torch.testing.assert_close(ops.atrous_conv2d(x, w, None, 1, 2, 2), F.conv2d(x, w, None, 1, 2, 2))
    torch.testing.assert_close(ops.conv_transpose2d(x, w, None, 2), F.conv_transpose2d(x, w, None, 2))


def test_torch_compile():
    g = _gen(9)
    x = _rand(2, 4, 9, 9, g=g, dtype=torch.float32)
    w = _rand(4, 4, 3, 3, g=g, dtype=torch.float32)
    wd = _rand(4, 1, 4, 4, g=g, dtype=torch.float32)

    def f(x, w, wd):
        y = torch.relu(ops.atrous_conv2d(x, w, None, 1, 2, 2))
        return ops.conv_transpose2d(y, wd, None, 2, 1, 0, 4).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [_leaf(t) for t in (x, w, wd)]
    eager_leaves = [_leaf(t) for t in (x, w, wd)]
    out = compiled(*leaves)
    ref = f(*eager_leaves)
    # default float32 tolerance (rtol 1.3e-6, atol 1e-5): the same kernels run eagerly and compiled; the scalar
    # loss sums ~1300 squares, so reordering alone could move it by ~1e-6 relative
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(ref, eager_leaves)):
        torch.testing.assert_close(a, b)


# ---- bad input ------------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(6, 2, 3, 3)
    a, t = ops.atrous_conv2d, ops.conv_transpose2d
    return [
        ("atrous channel mismatch", lambda: a(x, torch.randn(6, 3, 3, 3)), "channels"),
        ("atrous groups mismatch", lambda: a(x, w, None, 1, 0, 1, 3), "channels"),
        ("atrous out_channels % groups", lambda: a(x, torch.randn(5, 2, 3, 3), None, 1, 0, 1, 2), "divisible by groups"),
        ("atrous negative padding", lambda: a(x, w[:, :], None, 1, -1, 1, 2), "padding"),
        ("atrous zero stride", lambda: a(x, w, None, 0, 0, 1, 2), "stride"),
        ("atrous zero dilation", lambda: a(x, w, None, 1, 0, 0, 2), "dilation"),
        ("atrous zero groups", lambda: a(x, w, None, 1, 0, 1, 0), "groups"),
        ("atrous weight rank", lambda: a(x, torch.randn(6, 4, 3)), "weight must be 4-D"),
        ("atrous input rank", lambda: a(torch.randn(8, 8), w), "input must be 4-D"),
        ("atrous kernel too big", lambda: a(x, torch.randn(6, 4, 3, 3), None, 1, 0, 5), "smaller than the dilated"),
        ("atrous bias shape", lambda: a(x, w, torch.randn(5), 1, 0, 1, 2), "bias"),
        ("atrous dtype mix", lambda: a(x, w.double(), None, 1, 0, 1, 2), "dtype"),
        ("atrous integer input", lambda: a(x.long(), w.long(), None, 1, 0, 1, 2), "float"),
        ("transpose channel mismatch", lambda: t(x, torch.randn(3, 2, 3, 3)), "channels"),
        ("transpose groups", lambda: t(x, torch.randn(4, 2, 3, 3), None, 1, 0, 0, 3), "divisible by groups"),
        ("transpose output_padding", lambda: t(x, torch.randn(4, 2, 3, 3), None, 2, 0, 2), "output_padding"),
        ("transpose output_padding dil", lambda: t(x, torch.randn(4, 2, 3, 3), None, 1, 0, 1, 1, 1), "output_padding"),
        ("transpose negative padding", lambda: t(x, torch.randn(4, 2, 3, 3), None, 1, -1), "padding"),
        ("transpose zero stride", lambda: t(x, torch.randn(4, 2, 3, 3), None, 0), "stride"),
        ("transpose weight rank", lambda: t(x, torch.randn(4, 2, 3)), "weight must be 4-D"),
        ("transpose output too small", lambda: t(x[:, :, :1, :1], torch.randn(4, 2, 1, 1), None, 1, 1), "output size"),
        ("transpose bias shape", lambda: t(x, torch.randn(4, 2, 3, 3), torch.randn(4)), "bias"),
        ("bad stride type", lambda: a(x, torch.randn(6, 4, 3, 3), None, (1, 2, 3)), "stride"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(name, call, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call()


# ---- modules and the bilinear initialiser ------------------------------------------------------------------------------


def test_atrous_module_matches_torch_module():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 6, 3, padding=4, dilation=4, groups=2)
    torch.manual_seed(0)
    mine = AtrousConv2d(8, 6, 3, padding=4, dilation=4, groups=2)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():
        assert torch.equal(mine.state_dict()[k], ref.state_dict()[k])  # same init
    other = torch.nn.Conv2d(8, 6, 3, padding=4, dilation=4, groups=2)
    mine.load_state_dict(other.state_dict())
    x = torch.randn(2, 8, 13, 12)
    # default float32 tolerance (rtol 1.3e-6, atol 1e-5): 4 * 9 = 36 products of O(1) terms summed in different
    # orders by the two kernels: error ~1e-6 absolute
    torch.testing.assert_close(mine(x), other(x))
    reflect = AtrousConv2d(8, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
    twin = torch.nn.Conv2d(8, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
    twin.load_state_dict(reflect.state_dict())
    torch.testing.assert_close(reflect(x), twin(x))  # 36 products per output, as above
    for kwargs in [dict(kernel_size=3, dilation=2, padding="same"), dict(kernel_size=(2, 3), dilation=(3, 1),
                                                                           padding="same"),
                   dict(kernel_size=3, padding="valid"), dict(kernel_size=2, padding="same", padding_mode="circular")]:
        mine = AtrousConv2d(8, 4, **kwargs)
        twin = torch.nn.Conv2d(8, 4, **kwargs)
        twin.load_state_dict(mine.state_dict())
        torch.testing.assert_close(mine(x), twin(x))  # at most 8 * 6 = 48 float32 products: default tolerance


def test_transpose_module_matches_torch_module_and_output_size():
    torch.manual_seed(0)
    ref = torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2)
    torch.manual_seed(0)
    mine = ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():
        assert torch.equal(mine.state_dict()[k], ref.state_dict()[k])
    x = torch.randn(2, 6, 5, 7)
    # default float32 tolerance (rtol 1.3e-6, atol 1e-5): at most 3 * 9 = 27 products per output
    torch.testing.assert_close(mine(x), ref(x))
    torch.testing.assert_close(mine(x, output_size=[10, 14]), ref(x, output_size=[10, 14]))
    assert mine(x, output_size=[10, 14]).shape[-2:] == (10, 14)


def test_bilinear_kernel_is_fcn_filter():
    # default float64 tolerance: the filter values are dyadic fractions, computed exactly
    torch.testing.assert_close(bilinear_kernel_1d(4), torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=D64))
    torch.testing.assert_close(bilinear_kernel_1d(3), torch.tensor([0.5, 1.0, 0.5], dtype=D64))
    w = torch.empty(5, 5, 4, 4)
    bilinear_(w)
    k2 = bilinear_kernel_1d(4).float()[:, None] * bilinear_kernel_1d(4).float()[None, :]
    for i, j in itertools.product(range(5), range(5)):
        assert torch.equal(w[i, j], k2 if i == j else torch.zeros_like(k2))
    with pytest.raises(ValueError, match="4-D"):
        bilinear_(torch.empty(3, 3, 3))


@pytest.mark.parametrize("s", [2, 3, 4, 8])
@pytest.mark.parametrize("depthwise", [False, True])
def test_bilinear_layer_equals_interpolate(device, s, depthwise):
    # Away from a border band of s pixels (where interpolate clamps but the conv sees zero padding), the
    # fixed bilinear transposed conv IS bilinear interpolation with align_corners=False.
    K = 5
    k = 2 * s - s % 2
    p = (k - s + 1) // 2
    layer = ConvTranspose2d(K, K, k, stride=s, padding=p, groups=K if depthwise else 1, bias=False,
                            init="bilinear", trainable=False).to(device=device, dtype=D64)
    x = torch.randn(2, K, 7, 6, dtype=D64, generator=_gen(10)).to(device)
    out = layer(x)
    assert out.shape == (2, K, 7 * s, 6 * s)
    ref = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    # default float64 tolerance (rtol 1e-7, atol 1e-7): each output sums at most 4 weighted inputs (bilinear
    # interpolation in exact arithmetic on both sides), rounding ~1e-16
    torch.testing.assert_close(out[..., s:-s, s:-s], ref[..., s:-s, s:-s])


def test_fixed_bilinear_fast_path_tracks_weight_changes():
    K = 4
    layer = ConvTranspose2d(K, K, 4, stride=2, padding=1, bias=False, init="bilinear", trainable=False)
    assert not layer.weight.requires_grad and layer.weight.shape == (K, K, 4, 4)
    ref = torch.nn.ConvTranspose2d(K, K, 4, stride=2, padding=1, bias=False)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, K, 5, 5, requires_grad=True)
    assert layer._depthwise_weight() is not None  # diagonal weight: depthwise kernels
    # default float32 tolerance (rtol 1.3e-6, atol 1e-5): 4 taps per output (stride 2 over a 4x4 kernel) on the
    # depthwise side; torch also adds the 3 * 4 zero cross-channel products, which change nothing
    torch.testing.assert_close(layer(x), ref(x))
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x)
    (rx,) = torch.autograd.grad(ref(x).square().sum(), x)
    torch.testing.assert_close(gx, rx)  # 16 taps per input pixel, float32: default tolerance
    # a non-diagonal weight loaded later must switch back to the dense path
    dense = torch.nn.ConvTranspose2d(K, K, 4, stride=2, padding=1, bias=False)
    layer.load_state_dict(dense.state_dict())
    assert layer._depthwise_weight() is None
    torch.testing.assert_close(layer(x), dense(x))  # 4 * 4 = 16 float32 products per output: default tolerance
    with pytest.raises(ValueError, match="init"):
        ConvTranspose2d(K, K, 4, init="nearest")


# ---- CUDA parity ------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("groups,cig,cog", [(1, 5, 3), (2, 3, 2), (6, 1, 1)])
def test_cuda_parity(dtype, groups, cig, cog):
    g = _gen(11)
    x = _rand(2, cig * groups, 13, 11, g=g, dtype=dtype)
    w = _rand(cog * groups, cig, 3, 3, g=g, dtype=dtype, scale=0.3)
    wt = _rand(cig * groups, cog, 4, 3, g=g, dtype=dtype, scale=0.3)
    b = _rand(cog * groups, g=g, dtype=dtype)
    # float16: the CPU and CUDA sides each round once to half (eps 9.8e-4) after float32 sums of <= 5 * 12 = 60
    # products: two roundings differ by up to ~2 eps: 2e-3. float32 / float64: the default tolerances
    # (rtol 1.3e-6 / 1e-7) cover float32 / float64 sums of that length in different orders.
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else {}
    for fn, wgt in [(lambda x, w, b: ops.atrous_conv2d(x, w, b, (1, 2), (3, 2), (3, 2), groups), w),
                    (lambda x, w, b: ops.conv_transpose2d(x, w, b, (2, 3), (1, 2), (1, 0), groups, (2, 1)), wt)]:
        results = []
        for dev in ("cpu", "cuda"):
            leaves = [_leaf(t.to(dev)) for t in (x, wgt, b)]
            out = fn(*leaves)
            gout = torch.ones_like(out).mul_(0.5).to(dev)
            grads = torch.autograd.grad(out, leaves, gout)
            results.append([out.cpu()] + [t.cpu() for t in grads])
        for a, c in zip(*results):
            torch.testing.assert_close(c.float(), a.float(), **tol)  # tolerance: see `tol` above


@pytest.mark.cuda
def test_cuda_parity_large_depthwise_upsampling():
    g = _gen(12)
    x = _rand(2, 21, 16, 16, g=g, dtype=torch.float32)
    layer = ConvTranspose2d(21, 21, 64, stride=32, padding=16, bias=False, init="bilinear", trainable=False)
    out_cpu = layer(x)
    out_cuda = layer.cuda()(x.cuda())
    # default float32 tolerance: each output sums at most 4 taps of the 64x64 kernel (stride 32)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu)


# ---- kernel choice: every backend, the same results --------------------------------------------------------------
#
# kernel codes of the ops (segops/ops/conv_choice.py): bit 0 = vendor forward, bit 1 = vendor backward. 0 and 3 are
# what backend="segops" / "vendor" run; 1 and 2 are the mixed plans "auto" uses where one side wins per direction.
KERNEL_CODES = [0, 1, 2, 3]

# The conv test table: the geometries of the tests above (zero insertion, groups, depthwise wide kernels, dilation,
# strides, output_padding), each as (transposed, N, C_in, C_out, groups, kernel, stride, padding, dilation,
# output_padding, H, W). Every kernel family of segops appears: depthwise, gemm-1x1, gemm-rows, gemm-im2col.
CONV_TABLE = [
    (False, 2, 6, 4, 1, (3, 3), (1, 1), (2, 2), (2, 2), (0, 0), 9, 8),     # gemm-rows, dilated
    (False, 2, 6, 4, 2, (3, 2), (2, 1), (2, 1), (2, 3), (0, 0), 10, 9),    # gemm-im2col, grouped
    (False, 2, 6, 6, 6, (3, 3), (1, 1), (4, 4), (4, 4), (0, 0), 11, 7),    # depthwise atrous
    (False, 2, 6, 5, 1, (1, 1), (1, 1), (0, 0), (1, 1), (0, 0), 7, 6),     # gemm-1x1
    (False, 1, 4, 8, 2, (1, 1), (2, 2), (0, 0), (1, 1), (0, 0), 9, 9),     # strided 1x1 (im2col)
    (False, 2, 3, 4, 1, (3, 1), (1, 2), (1, 0), (2, 1), (0, 0), 8, 9),     # kernel column: no unfold along w
    (True, 2, 3, 4, 1, (3, 3), (2, 2), (1, 1), (1, 1), (1, 0), 5, 4),      # transposed, strided (im2col)
    (True, 2, 3, 4, 1, (2, 2), (2, 2), (0, 0), (1, 1), (0, 0), 5, 6),      # U-Net 2x2 / 2
    (True, 2, 4, 6, 2, (3, 3), (1, 1), (2, 2), (2, 2), (1, 1), 6, 5),      # transposed, stride 1 (gemm-rows)
    (True, 2, 3, 3, 3, (16, 15), (8, 8), (4, 4), (1, 1), (0, 0), 5, 7),    # depthwise wide (upsampling)
    (True, 1, 3, 2, 1, (1, 1), (1, 1), (0, 0), (2, 2), (1, 1), 4, 5),      # 1x1 with output_padding
]


def _table_call(case, kernel, dtype=D64, seed=0):
    transposed, N, cin, cout, G, k, s, p, d, op, H, W = case
    g = _gen(seed)
    x = _leaf(_rand(N, cin, H, W, g=g, dtype=dtype))
    wshape = (cin, cout // G) + k if transposed else (cout, cin // G) + k
    w = _leaf(_rand(*wshape, g=g, dtype=dtype, scale=0.5))
    b = _leaf(_rand(cout, g=g, dtype=dtype))
    if transposed:
        fn = lambda x, w, b: torch.ops.segops.conv_transpose2d.default(x, w, b, list(s), list(p), list(op), G, list(d),
                                                                       kernel)
        ref = lambda x, w, b: F.conv_transpose2d(x, w, b, s, p, op, G, d)
    else:
        fn = lambda x, w, b: torch.ops.segops.atrous_conv2d.default(x, w, b, list(s), list(p), list(d), G, kernel)
        ref = lambda x, w, b: F.conv2d(x, w, b, s, p, d, G)
    return fn, ref, (x, w, b), g


@pytest.mark.parametrize("kernel", KERNEL_CODES)
@pytest.mark.parametrize("case", CONV_TABLE, ids=lambda c: "T" if c[0] else "A")
def test_every_kernel_matches_torch_on_the_table(case, kernel):
    fn, ref, leaves, g = _table_call(case, kernel)
    out = fn(*leaves)
    gout = _rand(*out.shape, g=g)
    grads = torch.autograd.grad(out, leaves, gout)
    ref_leaves = [_leaf(t) for t in leaves]
    rout = ref(*ref_leaves)
    rgrads = torch.autograd.grad(rout, ref_leaves, gout)
    # float64 sums of at most C_in * kh * kw = 720 (gradients: N * H * W <= 240) products of O(1) terms: rounding
    # error ~ length * 2^-53 ~ 1e-13 relative, far inside rtol = 1e-10, atol = 1e-12.
    torch.testing.assert_close(out, rout, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "segops", "vendor"])
@pytest.mark.parametrize("case", CONV_TABLE, ids=lambda c: "T" if c[0] else "A")
def test_every_backend_agrees_in_float32(case, backend):
    # float32 against the float64 reference: each output sums at most 720 products (gradients 240 * 9), so the
    # float32 rounding error is below ~1e-4 relative to the sum of magnitudes (O(10) here); rtol 1e-4, atol 1e-4.
    transposed, N, cin, cout, G, k, s, p, d, op, H, W = case
    fn, ref, leaves, g = _table_call(case, 0, dtype=torch.float32)
    f32 = [_leaf(t.detach()) for t in leaves]
    if transposed:
        out = ops.conv_transpose2d(*f32, s, p, op, G, d, backend=backend)
    else:
        out = ops.atrous_conv2d(*f32, s, p, d, G, backend=backend)
    gout = _rand(*out.shape, g=g)
    grads = torch.autograd.grad(out, f32, gout.float())
    l64 = [_leaf(t.detach().double()) for t in leaves]
    rout = ref(*l64)
    rgrads = torch.autograd.grad(rout, l64, gout)
    torch.testing.assert_close(out.double(), rout, rtol=1e-4, atol=1e-4)  # tolerance: see the comment above
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


@given(_geometry(transposed=False), st.integers(0, 2**31 - 1), st.sampled_from(KERNEL_CODES))
def test_atrous_every_kernel_random_geometry(geo, seed, kernel):
    g = _gen(seed)
    G = geo["groups"]
    x = _leaf(_rand(geo["n"], geo["cig"] * G, *geo["hw"], g=g))
    w = _leaf(_rand(geo["cog"] * G, geo["cig"], *geo["k"], g=g))
    args = (list(geo["s"]), list(geo["p"]), list(geo["d"]), G)
    out = torch.ops.segops.atrous_conv2d.default(x, w, None, *args, kernel)
    gout = _rand(*out.shape, g=g)
    grads = torch.autograd.grad(out, (x, w), gout)
    xr, wr = _leaf(x), _leaf(w)
    ref = F.conv2d(xr, wr, None, *args)
    rgrads = torch.autograd.grad(ref, (xr, wr), gout)
    # float64, at most 3 * 4 * 4 = 48 products per output (gradients: 2 * 12 * 12 = 288): error ~1e-14 relative.
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["segops", "vendor", "auto"])
def test_deterministic_mode_is_bitwise_reproducible(backend):
    g = _gen(21)
    x = _rand(2, 16, 29, 27, g=g, dtype=torch.float32)
    w = _rand(16, 16, 3, 3, g=g, dtype=torch.float32, scale=0.2)
    wd = _rand(16, 1, 8, 8, g=g, dtype=torch.float32)
    w1 = _rand(8, 16, 1, 1, g=g, dtype=torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            leaves = [_leaf(t) for t in (x, w, wd, w1)]
            xl, wl, wdl, w1l = leaves
            with ops.conv_backend(backend):
                a = ops.atrous_conv2d(xl, wl, None, 1, 6, 6)
                t = ops.conv_transpose2d(a, wdl, None, 4, 2, 0, 16)
                c = ops.atrous_conv2d(a, w1l)
            loss = a.square().sum() + t.square().sum() + c.square().sum()
            runs.append([a, t, c] + list(torch.autograd.grad(loss, leaves)))
    finally:
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for r0, r1 in zip(runs[0], other):
            assert torch.equal(r0, r1)


# ---- kernel choice: the settings and their precedence ------------------------------------------------------------


def _ran(fn):
    """Which kernels a call ran, read from the profiler: the segops ranges and ATen's convolution."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    segops_ranges = {n for n in names if n.startswith("segops::conv/")}
    vendor = "aten::convolution" in names or "aten::convolution_backward" in names
    return segops_ranges, vendor


def test_backend_settings_and_precedence():
    from segops.ops import conv_choice

    x = torch.randn(1, 4, 9, 9)
    w = torch.randn(4, 4, 3, 3)
    assert ops.get_conv_backend() == "auto"
    assert conv_choice.explain(False, x, w, [1, 1], [1, 1], [1, 1], 1).backend == "auto"
    with ops.conv_backend("segops"):
        assert ops.get_conv_backend() == "segops"
        assert _ran(lambda: ops.atrous_conv2d(x, w, None, 1, 1)) == ({"segops::conv/gemm-rows"}, False)
        # a call's own setting wins over the context
        assert _ran(lambda: ops.atrous_conv2d(x, w, None, 1, 1, backend="vendor"))[1]
        with ops.conv_backend("vendor"):
            assert _ran(lambda: ops.atrous_conv2d(x, w, None, 1, 1)) == (set(), True)
        assert ops.get_conv_backend() == "segops"  # restored on exit
    assert ops.get_conv_backend() == "auto"
    try:
        ops.set_conv_backend("segops")
        assert _ran(lambda: ops.atrous_conv2d(x, w, None, 1, 1))[0] == {"segops::conv/gemm-rows"}
        with pytest.raises(ValueError, match="backend"):
            ops.set_conv_backend("cudnn")
        with pytest.raises(ValueError, match="backend"):
            with ops.conv_backend("fast"):
                pass
        assert ops.get_conv_backend() == "segops"
    finally:
        ops.set_conv_backend("auto")
    with pytest.raises(ValueError, match="backend"):
        ops.atrous_conv2d(x, w, None, 1, 1, backend="oneDNN")
    # the context is restored after an exception inside it
    with pytest.raises(RuntimeError):
        with ops.conv_backend("vendor"):
            raise RuntimeError("boom")
    assert ops.get_conv_backend() == "auto"


def test_layer_backend_setting():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    forced = AtrousConv2d(4, 6, 3, padding=2, dilation=2, backend="segops")
    follows = AtrousConv2d(4, 6, 3, padding=2, dilation=2)
    follows.load_state_dict(forced.state_dict())
    assert "backend='segops'" in repr(forced) and "backend" not in repr(follows)
    with ops.conv_backend("vendor"):
        # the layer's own setting wins over the context; the other layer follows it
        assert _ran(lambda: forced(x)) == ({"segops::conv/gemm-rows"}, False)
        assert _ran(lambda: follows(x)) == (set(), True)
        # float32, 4 * 9 = 36 products per output: two summation orders agree to ~1e-6 relative
        torch.testing.assert_close(forced(x), follows(x), rtol=1e-5, atol=1e-5)
    follows.backend = "segops"  # settable later
    assert _ran(lambda: follows(x))[0] == {"segops::conv/gemm-rows"}
    up = ConvTranspose2d(4, 4, 4, stride=2, padding=1, backend="vendor")
    assert _ran(lambda: up(x)) == (set(), True)
    with pytest.raises(ValueError, match="backend"):
        AtrousConv2d(4, 4, 3, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        ConvTranspose2d(4, 4, 3, backend="gpu")
    # the torch.nn twin of a model ignores the attribute
    from segops.models import to_torch_layers

    twin = to_torch_layers(torch.nn.Sequential(forced))
    assert type(twin[0]) is torch.nn.Conv2d
    # float32, 36 products per output (see above)
    torch.testing.assert_close(twin(x), forced(x), rtol=1e-5, atol=1e-5)


def test_backward_honours_the_choice():
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def run(kernel):
        def f():
            y = torch.ops.segops.atrous_conv2d.default(x, w, None, [1, 1], [2, 2], [2, 2], 1, kernel)
            y.sum().backward()
        return f

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(2)()  # segops forward, vendor backward
    names = [e.name for e in prof.events()]
    assert "segops::conv/gemm-rows" in names and "aten::convolution_backward" in names
    assert "aten::convolution" not in names
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(1)()  # vendor forward, segops backward
    names = [e.name for e in prof.events()]
    assert "aten::convolution" in names and "aten::convolution_backward" not in names
    assert names.count("segops::conv/gemm-rows") == 2  # input and weight gradients


@pytest.mark.parametrize("transposed", [False, True])
def test_profiler_names_the_family_the_rule_predicts(transposed):
    from segops.ops import conv_choice

    g = _gen(22)
    for case in CONV_TABLE:
        if case[0] != transposed:
            continue
        _, N, cin, cout, G, k, s, p, d, op, H, W = case
        x = _rand(N, cin, H, W, g=g, dtype=torch.float32)
        w = _rand(*((cin, cout // G) + k if transposed else (cout, cin // G) + k), g=g, dtype=torch.float32)
        choice = conv_choice.explain(transposed, x, w, list(s), list(p), list(d), G, "segops")
        if transposed:
            ran, _ = _ran(lambda: ops.conv_transpose2d(x, w, None, s, p, op, G, d, backend="segops"))
        else:
            ran, _ = _ran(lambda: ops.atrous_conv2d(x, w, None, s, p, d, G, backend="segops"))
        assert ran == {"segops::conv/" + choice.segops_kernel}, (case, ran)


# ---- the rule never picks a kernel that cannot run the call --------------------------------------------------------


@given(_geometry(transposed=False), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]), st.booleans(),
       st.sampled_from([True, False, False, False]))
def test_auto_runs_every_call(geo, seed, dtype, transposed, empty_batch):
    from segops.ops import conv_choice

    g = _gen(seed)
    G = geo["groups"]
    if transposed:
        assume(all(conv_transpose_output_size(geo["hw"][i], geo["k"][i], geo["s"][i], geo["p"][i], 0, geo["d"][i]) > 0
                   for i in range(2)))
    x = _rand(0 if empty_batch else geo["n"], geo["cig"] * G, *geo["hw"], g=g, dtype=dtype)
    if transposed:
        w = _rand(geo["cig"] * G, geo["cog"], *geo["k"], g=g, dtype=dtype)
        args = (list(geo["s"]), list(geo["p"]), [0, 0], G, list(geo["d"]))
        run, ref = ops.conv_transpose2d, F.conv_transpose2d
    else:
        w = _rand(geo["cog"] * G, geo["cig"], *geo["k"], g=g, dtype=dtype)
        args = (list(geo["s"]), list(geo["p"]), list(geo["d"]), G)
        run, ref = ops.atrous_conv2d, F.conv2d
    choice = conv_choice.explain(transposed, x, w, list(geo["s"]), list(geo["p"]), list(geo["d"]), G)
    assert choice.forward in ("segops", "vendor") and choice.backward in ("segops", "vendor")
    if x.numel() == 0:
        assert (choice.forward, choice.backward) == ("segops", "segops")  # ATen does not run every empty call
    xl, wl = _leaf(x), _leaf(w)
    out = run(xl, wl, None, *args)  # runs (no error) ...
    if out.numel():
        out.float().sum().backward()
        assert xl.grad is not None and wl.grad is not None
    # ... and computes the convolution: float64 reference; the tolerance is one rounding of the dtype (its eps)
    # times the sum of magnitudes (at most 48 products of O(1) terms) for the float32 / half accumulations.
    want = ref(x.double(), w.double(), None, *args)
    scale = ref(x.double().abs(), w.double().abs(), None, *args) + 1
    assert ((out.double() - want).abs() <= 4 * torch.finfo(dtype).eps * scale).all()


# ---- describe_kernels ---------------------------------------------------------------------------------------------


def test_describe_kernels_reports_each_layer():
    from segops.nn import ASPP, describe_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        AtrousConv2d(3, 8, 3, padding=1),
        ASPP(8, 4, rates=(2, 3), variant="v2", hidden_channels=None),
        ConvTranspose2d(4, 4, 16, stride=8, padding=4, bias=False, init="bilinear", trainable=False),
    )
    x = torch.randn(2, 3, 17, 17)
    report = describe_kernels(model, x)
    assert [r.layer for r in report] == ["0", "1.branches.0.conv", "1.branches.1.conv", "2"]
    assert [r.op for r in report] == ["atrous_conv2d"] * 3 + ["conv_transpose2d"]
    assert report[0].input_shape == (2, 3, 17, 17) and report[0].weight_shape == (8, 3, 3, 3)
    assert report[0].forward == "vendor" and report[0].reason.startswith("auto: cpu")
    # the frozen bilinear layer runs as a depthwise convolution, which segops wins on the CPU
    assert report[3].weight_shape == (4, 1, 16, 16) and report[3].forward == "segops:depthwise"
    assert "frozen diagonal weight" in report[3].note
    table = str(report)
    assert "1.branches.1.conv" in table and "segops:depthwise" in table
    assert report.counts() == {("vendor", "vendor"): 3, ("segops:depthwise", "segops:depthwise"): 1}
    with ops.conv_backend("segops"):
        forced = describe_kernels(model, x)
    assert [r.forward for r in forced] == ["segops:gemm-rows"] * 3 + ["segops:depthwise"]
    assert all(r.backend == "segops" for r in forced)
    # the recorder is off again: a plain call records nothing and the model runs as before
    from segops.ops import conv_choice

    assert conv_choice._recorder is None


def test_opcheck_every_kernel_code():
    g = _gen(23)
    x = _rand(2, 4, 7, 6, g=g, dtype=torch.float32).requires_grad_()
    w = _rand(4, 2, 3, 3, g=g, dtype=torch.float32).requires_grad_()
    b = _rand(4, g=g, dtype=torch.float32).requires_grad_()
    for kernel in (1, 2, 3):
        torch.library.opcheck(torch.ops.segops.atrous_conv2d.default, (x, w, b, [1, 2], [2, 1], [2, 1], 2, kernel))
        torch.library.opcheck(torch.ops.segops.conv_transpose2d.default,
                              (x, w, b, [2, 1], [1, 1], [1, 0], 2, [1, 2], kernel))
    y = ops.atrous_conv2d(x, w, b, [1, 2], [2, 1], [2, 1], 2).detach()
    torch.library.opcheck(torch.ops.segops._atrous_conv2d_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), [1, 2], [2, 1], [2, 1], 2, [True, True, True], 1))
    t = ops.conv_transpose2d(x, w, b, [2, 1], [1, 1], [1, 0], 2, [1, 2]).detach()
    torch.library.opcheck(torch.ops.segops._conv_transpose2d_backward.default,
                          (torch.randn_like(t), x.detach(), w.detach(), [2, 1], [1, 1], [1, 0], 2, [1, 2],
                           [True, True, False], 1))


@pytest.mark.parametrize("backend,compiler", [("segops", "aot_eager"), ("vendor", "aot_eager"), ("auto", "aot_eager"),
                                              pytest.param("segops", "inductor", marks=pytest.mark.slow)])
def test_torch_compile_every_backend(backend, compiler):
    # inductor: the segops ops in its graph run as fallback kernels (an op argument named like one of the
    # fallback's own parameters, e.g. `kernel`, broke the lowering)
    g = _gen(24)
    x = _rand(2, 4, 9, 9, g=g, dtype=torch.float32)
    w = _rand(4, 4, 3, 3, g=g, dtype=torch.float32)
    wd = _rand(4, 1, 8, 8, g=g, dtype=torch.float32)

    def f(x, w, wd):
        y = torch.relu(ops.atrous_conv2d(x, w, None, 1, 2, 2, backend=backend))
        return ops.conv_transpose2d(y, wd, None, 4, 2, 0, 4, backend=backend).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=compiler, fullgraph=True)
    leaves = [_leaf(t) for t in (x, w, wd)]
    eager = [_leaf(t) for t in (x, w, wd)]
    out, ref = compiled(*leaves), f(*eager)
    # the same convolution kernels run eagerly and compiled; inductor may fuse relu / square / sum differently
    # (float32 sum of 2 * 4 * 36 * 36 = 10368 squares in another order: ~1e-7 relative): rtol 1e-6
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(ref, eager)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- the gemm-rows / im2col blocking (buffers larger than one block) ------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_row_blocks_and_halo(stride):
    # The two side taps' unfolds, C_in * 2 * 252 columns (~129K floats) per row: the 2^22-element scratch holds ~32
    # rows, so with a dilation-4 halo of 8 rows the 40-row map is cut into blocks of 24 rows (stride 2: im2col blocks
    # of 14 rows).
    g = _gen(25)
    x = _leaf(_rand(1, 256, 40, 256, g=g, dtype=torch.float32, scale=0.1))
    w = _leaf(_rand(3, 256, 3, 3, g=g, dtype=torch.float32, scale=0.1))
    out = ops.atrous_conv2d(x, w, None, stride, 4, 4, backend="segops")
    gout = _rand(*out.shape, g=g, dtype=torch.float32)
    grads = torch.autograd.grad(out, (x, w), gout)
    x64, w64 = _leaf(x.double()), _leaf(w.double())
    ref = F.conv2d(x64, w64, None, stride, 4, 4)
    rgrads = torch.autograd.grad(ref, (x64, w64), gout.double())
    # float32: outputs sum 256 * 9 = 2304 products of magnitude ~0.01 (error ~1e-6 absolute); weight gradients
    # sum ~10^4 products of O(0.1) (error ~1e-4 relative to their O(10) size)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0].double(), rgrads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1].double(), rgrads[1], rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNEL_CODES)
@pytest.mark.parametrize("case", CONV_TABLE, ids=lambda c: "T" if c[0] else "A")
def test_cuda_parity_every_kernel(case, kernel):
    # float64 on both devices: sums of at most 720 products (see the CPU table test): rtol 1e-10, atol 1e-12.
    results = []
    for dev in ("cpu", "cuda"):
        fn, _, leaves, g = _table_call(case, kernel)
        leaves = [_leaf(t.detach().to(dev)) for t in leaves]
        out = fn(*leaves)
        gout = _rand(*out.shape, g=g).to(dev)
        results.append([out.cpu()] + [t.cpu() for t in torch.autograd.grad(out, leaves, gout)])
    for a, c in zip(*results):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("own_gemm", [False, True])
def test_auto_picks_segops_for_large_unet_upconvs_on_the_cpu(own_gemm, monkeypatch):
    # 2x2 / stride 2 transposed convolutions, float32, CPU (fwd + bwd, 2 threads, idle machines). With ATen's GEMM
    # (MKL): segops 1.42-2.50x oneDNN at 224x224 on both CPUs measured; from 28x28 to 112x112 1.27-1.69x on one and
    # 0.59-0.80x on the other; so oneDNN below 160x160. With segops' AVX-512 GEMM (AMD CPUs): 1.00-1.31x from 56x56
    # to 112x112, 0.96-1.03x at 14x14-28x28: segops from 56x56.
    from segops.ops import conv_choice

    monkeypatch.setattr(conv_choice, "_OWN_CPU_GEMM", own_gemm)

    def choice(n, cin, cout, hw, dtype=torch.float32):
        x = torch.empty(n, cin, hw, hw, dtype=dtype)
        w = torch.empty(cin, cout, 2, 2, dtype=dtype)
        c = conv_choice.explain(True, x, w, [2, 2], [0, 0], [1, 1], 1)
        return c.forward, c.backward

    mid = [(2, 128, 64, 112), (2, 256, 128, 56)]  # full width, 56x56 and 112x112
    for shape in [(2, 128, 64, 224), (2, 64, 32, 224), (2, 64, 32, 160)] + (mid if own_gemm else []):
        assert choice(*shape) == ("segops", "segops"), shape
    for shape in ([] if own_gemm else mid) + [(2, 512, 256, 28), (2, 1024, 512, 28),  # full width
                                              (2, 32, 16, 80), (2, 256, 128, 20), (2, 1024, 512, 14),  # width-scaled
                                              (2, 8, 8, 224)]:  # under 20M multiply-adds per tap
        assert choice(*shape) == ("vendor", "vendor"), shape
    assert choice(2, 128, 64, 224, torch.bfloat16) == ("vendor", "vendor")  # measured for float32 only


@pytest.mark.cuda
def test_cuda_deterministic_mode_bitwise_and_choice():
    from segops.ops import conv_choice

    g = _gen(26)
    x = _rand(2, 32, 33, 33, g=g, dtype=torch.float32).cuda()
    w = _rand(16, 32, 3, 3, g=g, dtype=torch.float32, scale=0.1).cuda()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        choice = conv_choice.explain(False, x, w, [1, 1], [6, 6], [6, 6], 1)
        assert (choice.forward, choice.backward) == ("vendor", "segops")  # cuDNN forward, segops backward
        runs = []
        for _ in range(3):
            xl, wl = _leaf(x), _leaf(w)
            out = ops.atrous_conv2d(xl, wl, None, 1, 6, 6)
            runs.append([out] + list(torch.autograd.grad(out.square().sum(), (xl, wl))))
    finally:
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for r0, r1 in zip(runs[0], other):
            assert torch.equal(r0, r1)
