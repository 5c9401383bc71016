"""Runs every CUDA kernel of segops once (forward, backward; the lattice also double backward, both key paths,
the normalised filter, a lattice built once and applied with W and W^T, the CRF / normalized-cut losses, also
with CPU images, and their half-resolution resize) on small inputs, for compute-sanitizer.

`compute-sanitizer --tool memcheck python scripts/cuda_driver.py`: every launch sees sizes that do not
divide the block size, strided / channels_last inputs, half precision and ignored pixels, so out-of-bounds
accesses, races and uninitialised reads show up. Exits non-zero if a result is not finite.
"""

from __future__ import annotations

import sys

import torch

import segops
from segops import ops


def check(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            print("cuda_driver: non-finite result in", name)
            sys.exit(1)
    print("cuda_driver: ok", name)


def losses(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        for layout in ("nchw", "channels_last"):
            x = torch.randn(2, 21, 37, 29, generator=g).to(dev, dtype)
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            t = torch.randint(0, 21, (2, 37, 29), generator=g)
            t[torch.rand(2, 37, 29, generator=g) < 0.9] = 255
            t = t.to(dev)
            w = torch.rand(21, generator=g).to(dev, dtype)
            for reduction in ("mean", "sum", "none"):
                loss = ops.partial_cross_entropy(x, t, 255, w, reduction, 0.1)
                ent = ops.entropy(x, t != 255, reduction)
                (loss.float().sum() + ent.float().sum()).backward()
                check("softmax losses %s %s %s" % (dtype, layout, reduction), loss, ent, x.grad)
                x.grad = None


def loss_reductions(dev: torch.device) -> None:
    """The one-launch reductions of the softmax losses: many blocks (last-block ticket), one block, an empty batch,
    the synchronous label check (device buffer + atomicMin), the warp-cooperative sparse path (3% labelled) and a
    CUDA graph capture (the launch's own ticket)."""
    g = torch.Generator().manual_seed(2)
    for B, K, H, W in ((4, 21, 131, 257), (2, 40, 17, 33), (1, 21, 3, 5), (0, 21, 7, 7)):  # K = 40: 2 class rounds
        x = torch.randn(B, K, H, W, generator=g).to(dev).requires_grad_()
        t = torch.randint(0, K, (B, H, W), generator=g)
        t[torch.rand(B, H, W, generator=g) < 0.97] = 255
        t = t.to(dev)
        for reduction in ("mean", "sum"):
            loss = ops.partial_cross_entropy(x, t, 255, None, reduction, 0.0, check_labels=True)
            ent = ops.entropy(x, None, reduction)
            (loss + ent).backward()
            check("loss reduction %dx%dx%dx%d %s" % (B, K, H, W, reduction), loss, ent, x.grad)
            x.grad = None
    x = torch.randn(2, 21, 37, 29, generator=g).to(dev).requires_grad_()
    t = torch.randint(0, 21, (2, 37, 29), generator=g).to(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.partial_cross_entropy(x, t).backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ops.partial_cross_entropy(x, t) + ops.entropy(x)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    check("loss reduction under graph capture", loss, x.grad)


def convolutions(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    cases = [  # (groups, C_in, C_out, kernel, stride, padding, dilation, output_padding)
        (1, 6, 8, 3, 1, 2, 2, 0),     # dense atrous (im2col + GEMM)
        (2, 6, 4, 3, 2, 1, 1, 1),     # grouped, strided
        (6, 6, 6, 3, 1, 6, 6, 0),     # depthwise atrous
        (6, 6, 6, 4, 2, 1, 1, 0),     # depthwise transposed x2 (bilinear-like)
        (1, 5, 7, 2, 2, 0, 1, 0),     # U-Net 2x2 stride 2
        (1, 6, 8, 1, 1, 0, 1, 0),     # 1x1 (gemm-1x1: products over the input itself)
        (2, 6, 4, 1, 2, 0, 1, 0),     # strided 1x1 (im2col)
    ]
    for dtype in (torch.float32, torch.float16, torch.float64):
        for groups, cin, cout, k, stride, pad, dil, opad in cases:
            x = torch.randn(2, cin, 13, 11, generator=g).to(dev, dtype).requires_grad_()
            w = torch.randn(cout, cin // groups, k, k, generator=g).to(dev, dtype).requires_grad_()
            b = torch.randn(cout, generator=g).to(dev, dtype).requires_grad_()
            # backend="segops": "auto" gives most of these small CUDA convolutions to cuDNN, whose kernels are not
            # ours to check (racecheck flags one of cuDNN's dgrad kernels); the mixed plans below run both sides
            y = ops.atrous_conv2d(x, w, b, stride, pad, dil, groups, backend="segops")
            y.float().square().sum().backward()
            check("atrous_conv2d %s g=%d k=%d s=%d d=%d" % (dtype, groups, k, stride, dil), y, x.grad, w.grad, b.grad)
            wt = torch.randn(cin, cout // groups, k, k, generator=g).to(dev, dtype).requires_grad_()
            xt = x.detach().to(memory_format=torch.channels_last).requires_grad_()
            y = ops.conv_transpose2d(xt, wt, b, stride, pad, opad if stride > 1 else 0, groups, dil, backend="segops")
            y.float().square().sum().backward()
            check("conv_transpose2d %s g=%d k=%d s=%d d=%d" % (dtype, groups, k, stride, dil), y, xt.grad, wt.grad)
            # the mixed plans: vendor forward + segops backward (deterministic dilated), and the reverse
            for kernel in (1, 2):
                x.grad = w.grad = None
                y = torch.ops.segops.atrous_conv2d.default(x, w, b, [stride] * 2, [pad] * 2, [dil] * 2, groups,
                                                           kernel)
                y.float().square().sum().backward()
                check("atrous_conv2d kernel=%d %s g=%d k=%d" % (kernel, dtype, groups, k), y, x.grad, w.grad)


def lattice(dev: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    for d, spread in ((1, 1.0), (3, 1.0), (5, 2.0), (8, 3000.0), (16, 1.0)):  # d=8 x3000: general key path
        for dtype in (torch.float32, torch.float64, torch.float16):
            v = torch.randn(2, 5, 13, 11, generator=g).to(dev, dtype).requires_grad_()
            f = (torch.randn(2, d, 13, 11, generator=g) * spread).to(dev)
            for normalize in (False, True):
                out = ops.permutohedral_filter(v, f, normalize)
                (gv,) = torch.autograd.grad(out.float().square().sum(), v, create_graph=True)
                (ggv,) = torch.autograd.grad(gv.float().sum(), v)
                check("filter d=%d %s normalize=%s" % (d, dtype, normalize), out, gv, ggv)
            lat = ops.build_lattice(f.to(torch.float64 if dtype == torch.float64 else torch.float32))
            for transposed in (False, True):  # build once, filter many: splat gather, blur order, slice
                out = lat.filter(v, normalize=True, transposed=transposed)
                (gv,) = torch.autograd.grad(out.float().square().sum(), v)
                check("lattice.filter d=%d %s transposed=%s" % (d, dtype, transposed), out, gv)
    img = (torch.rand(3, 3, 37, 29, generator=g) * 255).to(dev)
    seg = torch.softmax(torch.randn(3, 21, 37, 29, generator=g), 1).to(dev).requires_grad_()
    roi = (torch.rand(3, 37, 29, generator=g) > 0.2).float().to(dev)
    for fn in (ops.dense_crf_loss, ops.normalized_cut_loss):
        for scale in (1.0, 0.5):
            for images, rois in ((img, roi), (img.cpu(), roi.cpu())):  # CPU images / rois: moved to the GPU
                loss = fn(images, seg, 1e-3, 15.0, 8.0, scale, rois)
                (gs,) = torch.autograd.grad(loss, seg)
                check("%s scale=%g images on %s" % (fn.__name__, scale, images.device), loss, gs)


def crf_inference(dev: torch.device) -> None:
    # the mean-field update (forward, _out, backward, double backward) on sizes that do not divide the block,
    # every dtype, 0..3 messages with and without scales; then whole inference runs through it
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for terms in range(4):
            u = torch.randn(2, 21, 13, 11, generator=g).to(dev, dtype).requires_grad_()
            ms = [torch.randn(2, 21, 13, 11, generator=g).to(dev, dtype).requires_grad_() for _ in range(terms)]
            ss = [torch.rand(2, 1, 13, 11, generator=g).to(dev, dtype) if j % 2 == 0 else None for j in range(terms)]
            ws = [float(j) - 1.5 for j in range(terms)]
            q = ops.crf_inference.crf_mean_field_update(u, ms, ss, ws)
            out = torch.empty_like(q)
            fixed = [s if s is not None else u.new_empty(0) for s in ss]
            torch.ops.segops._crf_mean_field_update_out(u.detach(), [m.detach() for m in ms], fixed, ws, out)
            (gu,) = torch.autograd.grad(q.float().square().sum(), u, create_graph=True)
            (ggu,) = torch.autograd.grad(gu.float().sum(), u)
            check("crf_mean_field_update %s terms=%d" % (dtype, terms), q, out, gu, ggu)
    img = (torch.rand(3, 3, 37, 29, generator=g) * 255).to(dev)
    unary = (torch.rand(3, 21, 37, 29, generator=g) * 4).to(dev)
    for mode in ("symmetric", "none"):
        q = ops.dense_crf_inference(unary, img, 3, normalization=mode)  # the one-op schedule (Potts, no grad)
        # a matrix compatibility: the separate ops (lattice filters, then the update) without autograd
        qm = ops.dense_crf_inference(unary, img, 2, bilateral_compat=-10 * torch.eye(21, device=dev),
                                     normalization=mode)
        check("dense_crf_inference separate ops %s" % mode, qm)
        u = unary.double().requires_grad_()
        (gu,) = torch.autograd.grad(ops.dense_crf_inference(u, img, 2, normalization=mode)[:, 0].sum(), u)
        check("dense_crf_inference %s" % mode, q, gu)


def resize(dev: torch.device) -> None:
    # the CRF losses' half-resolution op on its own: every dtype, odd sizes, channels_last (made contiguous),
    # forward and backward
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in ((2, 21, 37, 29), (1, 3, 2, 3), (3, 5, 64, 65)):
            x = torch.randn(shape, generator=g).to(dev, dtype)
            x = x.to(memory_format=torch.channels_last).requires_grad_()
            y = ops.half_resolution(x)
            (gx,) = torch.autograd.grad(y.float().square().sum(), x)
            check("half_resolution %s %s" % (dtype, shape), y, gx)


DRIVERS = [losses, loss_reductions, convolutions, lattice, crf_inference, resize]


def main() -> int:
    if not torch.cuda.is_available() or not segops.info()["cuda_kernels_compiled"]:
        print("cuda_driver: needs a GPU and segops built with CUDA kernels")
        return 2
    dev = torch.device("cuda")
    for driver in DRIVERS:
        driver(dev)
    torch.cuda.synchronize()
    print("cuda_driver: all kernels ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
