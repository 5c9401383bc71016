"""segops' AVX-512 float GEMM under the CPU convolutions (csrc/cpu/gemm_cpu.cpp): error bounds on awkward shapes
and layouts, results independent of the thread count, and the SEGOPS_CPU_GEMM setting."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import segops
from segops import ops
from segops.info import format_info

U32 = 2.0**-24  # unit roundoff of float32


def _gemm_available() -> bool:
    old = os.environ.get("SEGOPS_CPU_GEMM")
    os.environ["SEGOPS_CPU_GEMM"] = "segops"
    try:
        return bool(torch.ops.segops._cpu_gemm_enabled())
    finally:
        if old is None:
            del os.environ["SEGOPS_CPU_GEMM"]
        else:
            os.environ["SEGOPS_CPU_GEMM"] = old


needs_avx512 = pytest.mark.skipif(not _gemm_available(), reason="segops' CPU GEMM needs AVX-512 (F, BW, VL, DQ)")


def test_setting_switches_the_gemm(monkeypatch):
    monkeypatch.setenv("SEGOPS_CPU_GEMM", "aten")
    assert not torch.ops.segops._cpu_gemm_enabled()
    assert segops.info()["cpu_gemm"] == "ATen BLAS"
    monkeypatch.setenv("SEGOPS_CPU_GEMM", "segops")
    assert torch.ops.segops._cpu_gemm_enabled() == _gemm_available()
    expected = "segops (AVX-512)" if _gemm_available() else "ATen BLAS"
    assert segops.info()["cpu_gemm"] == expected
    assert any(line.startswith("CPU GEMM") and line.endswith("  " + expected)
               for line in format_info(segops.info()).splitlines())


# (name, transposed, N, C_in, C_out, H, W, kernel, stride, padding, dilation, groups). The product sizes are
# chosen off the kernel's tile (12 rows x 32 columns) and depth block (256): M, N and K with remainders, K over
# one block (two or more blocks per element), one-element matrices.
CASES = [
    ("1x1 K=300", False, 2, 300, 25, 7, 9, 1, 1, 0, 1, 1),
    ("1x1 one pixel", False, 1, 5, 1, 1, 1, 1, 1, 0, 1, 1),
    ("3x3 dilated K=360", False, 1, 40, 13, 17, 19, 3, 1, 2, 2, 1),
    ("3x3 stride 2 (im2col)", False, 2, 30, 14, 15, 16, 3, 2, 1, 1, 1),
    ("3x3 grouped", False, 2, 64, 26, 11, 10, 3, 1, 1, 1, 2),
    ("2x2/2 transposed", True, 2, 40, 20, 9, 11, 2, 2, 0, 1, 1),
    ("4x4/2 transposed grouped", True, 1, 36, 24, 8, 7, 4, 2, 1, 1, 3),
]


def _conv(transposed, x, w, b, stride, padding, dilation, groups):
    if transposed:
        return ops.conv_transpose2d(x, w, b, stride, padding, 0, groups, dilation)
    return ops.atrous_conv2d(x, w, b, stride, padding, dilation, groups)


def _torch_conv(transposed, x, w, b, stride, padding, dilation, groups):
    if transposed:
        return F.conv_transpose2d(x, w, b, stride, padding, 0, groups, dilation)
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@needs_avx512
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_within_the_rounding_bound(case, channels_last, monkeypatch):
    monkeypatch.setenv("SEGOPS_CPU_GEMM", "segops")
    _, transposed, N, Ci, Co, H, W, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(hash(case[0]) % 2**31)
    x = torch.randn(N, Ci, H, W, generator=gen)
    w = torch.randn(*((Ci, Co // g) if transposed else (Co, Ci // g)), k, k, generator=gen) * 0.3
    b = torch.randn(Co, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    with ops.conv_backend("segops"):
        y = _conv(transposed, xl, wl, bl, s, p, d, g)
    gy = torch.randn(y.shape, generator=gen)
    gx, gw, gb = torch.autograd.grad(y, (xl, wl, bl), gy)

    # Reference: float64 on the same (float32-representable) values. Rounding bound per element: a float32 sum of
    # n products (fused multiply-adds, then a few partial sums added) is off by at most ~n u times the sum of the
    # products' magnitudes (first-order bound, u = 2^-24), with n the longest sum: a forward output sums
    # C_in/groups k^2 products and the bias, an input gradient C_out/groups k^2, a weight gradient N H_out W_out.
    # The magnitudes come from the same computation on |values| in float64 (autograd of the abs-valued conv).
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = _torch_conv(transposed, x64, w64, b64, s, p, d, g)
    rx, rw, rb = torch.autograd.grad(y64, (x64, w64, b64), gy.double())
    xa, wa = (t.double().abs().requires_grad_() for t in (x, w))
    ya = _torch_conv(transposed, xa, wa, b.double().abs(), s, p, d, g)
    ax, aw = torch.autograd.grad(ya, (xa, wa), gy.double().abs())
    n = 2 + max(Ci // g * k * k, Co // g * k * k, N * y.shape[2] * y.shape[3])
    for got, ref, mag, what in ((y, y64, ya, "output"), (gx, rx, ax, "grad input"), (gw, rw, aw, "grad weight")):
        err = (got.double() - ref).abs()
        bound = n * U32 * mag + 1e-30
        assert bool((err <= bound).all()), (what, float((err / bound).max()))
    # the bias gradient sums N H_out W_out values of gy per channel (the same bound, no products)
    mag_b = gy.double().abs().sum((0, 2, 3))
    assert bool(((gb.double() - rb).abs() <= n * U32 * mag_b).all())


@needs_avx512
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    # 2 x 256 x 256 x 1024 x 2 = 268 M flops per product: the GEMM splits C across both threads; every element is
    # still computed by one thread in one order, so the bits must not change.
    monkeypatch.setenv("SEGOPS_CPU_GEMM", "segops")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 256, 32, 32, generator=gen)
    w3 = torch.randn(256, 256, 3, 3, generator=gen) * 0.05
    w1 = torch.randn(200, 256, 1, 1, generator=gen) * 0.05
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            xl, w3l, w1l = (v.clone().requires_grad_() for v in (x, w3, w1))
            with ops.conv_backend("segops"):
                y = ops.atrous_conv2d(ops.atrous_conv2d(xl, w3l, None, 1, 2, 2), w1l)
            runs.append([y] + list(torch.autograd.grad(y.square().sum(), (xl, w3l, w1l))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_tap_share_counts_the_pairs_inside_the_image():
    from segops.ops.conv_choice import _tap_share

    # 33 rows, 3x3 rate 6, padding 6: kernel rows 0 and 2 reach 27 of the 33 output rows, row 1 all 33
    assert _tap_share(33, 3, 6, 6) == (27 + 33 + 27) / 99
    assert _tap_share(33, 3, 24, 24) == (9 + 33 + 9) / 99
    assert _tap_share(10, 3, 1, 1) == (9 + 10 + 9) / 30
    assert _tap_share(8, 1, 0, 1) == 1.0
    # every small geometry, strides included, against counting the pairs one by one
    for size, k, pad, dil, stride in itertools.product(range(1, 12), range(1, 4), range(4), range(1, 4), range(1, 4)):
        out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        if out <= 0:
            continue
        inside = sum(0 <= o * stride + i * dil - pad < size for o in range(out) for i in range(k))
        assert _tap_share(size, k, pad, dil, stride) == pytest.approx(inside / (k * out), abs=1e-15)


@pytest.mark.parametrize("own_gemm", [False, True])
def test_auto_rule_uses_the_gemm_only_where_it_runs(own_gemm):
    from segops.ops.conv_choice import _rule

    def vendor(family, kernel, dtype=torch.float32, transposed=False, share=1.0, rate=1, macs=10**7):
        vf, vb, _ = _rule(transposed, "cpu", dtype, family, kernel, (1, 1), rate > 1, False, 33 * 33, macs,
                          own_gemm, share, rate)
        assert vf == vb
        return vf

    assert vendor("gemm-1x1", (1, 1)) is not own_gemm
    assert vendor("gemm-1x1", (1, 1), macs=64 * 21 * 25)  # a few microseconds of work: per-call overhead decides
    # rates >= 12 (1.08-10x oneDNN): ASPP r12 at 33x33 (57% of the work inside), r12 at 81x81 (81%)
    assert vendor("gemm-rows", (3, 3), share=0.57, rate=12) is not own_gemm
    assert vendor("gemm-rows", (3, 3), share=0.81, rate=12) is not own_gemm
    assert vendor("gemm-rows", (3, 3), share=0.40, rate=6) is not own_gemm  # r6 on 11x11 maps: 1.02x
    # kept on oneDNN with the GEMM too: dense 3x3, rates 2-6 on larger maps (0.58-0.95x), rate 12 beyond the
    # measured shares
    assert vendor("gemm-rows", (3, 3), share=0.98)
    assert vendor("gemm-rows", (3, 3), share=0.66, rate=6)
    assert vendor("gemm-rows", (3, 3), share=0.88, rate=4)
    assert vendor("gemm-rows", (3, 3), share=0.90, rate=12)
    assert vendor("gemm-1x1", (1, 1), dtype=torch.bfloat16)
    assert not vendor("gemm-1x1", (1, 1), dtype=torch.float64)  # ATen's generic float64 kernel loses either way

    def vendor_up(side):  # U-Net's 2x2/2 up-convolution, 512 -> 256 channels on side x side maps
        vf, vb, _ = _rule(True, "cpu", torch.float32, "gemm-im2col", (2, 2), (2, 2), False, False, side * side,
                          512 * 256 * side * side, own_gemm)
        return vf and vb

    assert vendor_up(56) is not own_gemm  # 1.31x oneDNN with segops' GEMM, 0.76x with MKL's
    assert vendor_up(28)  # level with oneDNN either way (0.97-1.03x): oneDNN
    assert not vendor_up(224)  # 1.4-2.5x with either GEMM
