"""Runs every CUDA kernel of the permutohedral lattice once (forward, backward, double backward, both key
paths, normalised filter, the CRF and normalized-cut losses) on small odd-sized inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck python scripts/lattice_cuda_driver.py

`lattice(dev)` is meant to join DRIVERS in scripts/cuda_driver.py. Exits non-zero on a non-finite result.
"""

from __future__ import annotations

import sys

import torch

import segops
from segops import ops


def check(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            print("lattice_cuda_driver: non-finite result in", name)
            sys.exit(1)
    print("lattice_cuda_driver: ok", name)


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
    img = (torch.rand(3, 3, 37, 29, generator=g) * 255).to(dev)
    seg = torch.softmax(torch.randn(3, 21, 37, 29, generator=g), 1).to(dev).requires_grad_()
    roi = (torch.rand(3, 37, 29, generator=g) > 0.2).float().to(dev)
    for fn in (ops.dense_crf_loss, ops.normalized_cut_loss):
        for scale in (1.0, 0.5):
            loss = fn(img, seg, 1e-3, 15.0, 8.0, scale, roi)
            (gs,) = torch.autograd.grad(loss, seg)
            check("%s scale=%g" % (fn.__name__, scale), loss, gs)


def main() -> int:
    if not torch.cuda.is_available() or not segops.info()["cuda_kernels_compiled"]:
        print("lattice_cuda_driver: no CUDA device or segops built without CUDA kernels")
        return 2
    lattice(torch.device("cuda"))
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
