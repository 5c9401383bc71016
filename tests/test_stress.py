"""Races and large sizes: every compiled op run repeatedly on fresh random inputs, and CPU/CUDA parity at sizes
well beyond the unit tests'.

Each case is seeded: seed 0 by default (so `make test` is reproducible), SEGOPS_STRESS_SEED=<int> to replay a
given input, SEGOPS_STRESS_SEED=random for a fresh seed per run (printed on failure) when hunting for races. Inputs are float64 so that a difference between runs or devices can only come from a bug:
float64 atomics reorder sums of at most a few million terms, which moves a result by ~1e-12 relative, while a race
or an indexing error moves it by O(1). CPU kernels use fixed work partitions, so their repeated runs must agree
bit for bit.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List

import pytest
import torch

import segops.ops as ops

Tensors = List[torch.Tensor]


def _seed() -> int:
    env = os.environ.get("SEGOPS_STRESS_SEED", "0")
    return int.from_bytes(os.urandom(4), "little") if env == "random" else int(env)


def _image(B: int, H: int, W: int, g: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) float64 in 0..255: blocky colour regions plus noise, so the lattice has many shared vertices."""
    blocks = torch.rand(B, 3, (H + 7) // 8, (W + 7) // 8, generator=g, dtype=torch.float64) * 255
    img = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)[:, :, :H, :W]
    return (img + torch.randn(B, 3, H, W, generator=g, dtype=torch.float64) * 3).clamp(0, 255)


def _grads(out: torch.Tensor, leaves: Tensors, g: torch.Generator) -> Tensors:
    go = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, go))


# Each case: (seed, device, size) -> [output, grads...]; "size" picks a small shape for repeat runs and a large one
# for the parity test.
def _pce(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, K, S = (4, 21, 512) if large else (2, 21, 67)
    x = torch.randn(B, K, S, S, generator=g, dtype=torch.float64)
    t = torch.randint(0, K, (B, S, S), generator=g)
    t[torch.rand(B, S, S, generator=g) > 0.03] = 255  # scribble-like: ~3% labelled
    x = x.to(dev).requires_grad_()
    return _grads(ops.partial_cross_entropy(x, t.to(dev), reduction="sum"), [x], g)


def _entropy(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, K, S = (4, 21, 512) if large else (2, 21, 67)
    x = (torch.randn(B, K, S, S, generator=g, dtype=torch.float64) * 3).to(dev).requires_grad_()
    return _grads(ops.entropy(x, reduction="sum"), [x], g)


def _filter(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, C, S = (2, 21, 384) if large else (2, 5, 61)
    img = _image(B, S, S, g)
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64), indexing="ij")
    feats = torch.cat([torch.stack([xx, yy]).expand(B, 2, S, S) / 10.0, img / 15.0], 1)
    v = torch.rand(B, C, S, S, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    return _grads(ops.permutohedral_filter(v, feats.to(dev), normalize=True), [v], g)


def _crf(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, K, S = (2, 21, 384) if large else (2, 6, 61)
    img = _image(B, S, S, g).to(dev)
    seg = torch.softmax(torch.randn(B, K, S, S, generator=g, dtype=torch.float64), 1).to(dev).requires_grad_()
    roi = (torch.rand(B, S, S, generator=g) > 0.1).to(torch.float64).to(dev)
    crf = ops.dense_crf_loss(img, seg, 1e-3, 15.0, 10.0, 1.0, roi)
    ncut = ops.normalized_cut_loss(img, seg, 1.0, 15.0, 10.0, 0.5, roi)
    return _grads(crf, [seg], g) + _grads(ncut, [seg], g)


def _atrous(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, C, S, d = (2, 64, 97, 12) if large else (2, 8, 23, 3)
    x = torch.randn(B, C, S, S, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    w = torch.randn(C, C // 2, 3, 3, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    return _grads(ops.atrous_conv2d(x, w, b, 1, d, d, 2), [x, w, b], g)


def _transpose(seed: int, dev: str, large: bool) -> Tensors:
    g = torch.Generator().manual_seed(seed)
    B, C, S = (2, 21, 48) if large else (2, 6, 9)
    x = torch.randn(B, C, S, S, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    wd = torch.randn(C, 1, 16, 16, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    wf = torch.randn(C, 4, 2, 2, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    depthwise = ops.conv_transpose2d(x, wd, None, 8, 4, 0, C)  # x8 upsampling, overlapping taps
    unet = ops.conv_transpose2d(x, wf, None, 2, 0, 0, 1)  # 2x2 / 2, dense
    return _grads(depthwise, [x, wd], g) + _grads(unet, [x, wf], g)


CASES: Dict[str, Callable[[int, str, bool], Tensors]] = {
    "partial_cross_entropy": _pce,
    "entropy": _entropy,
    "permutohedral_filter": _filter,
    "crf_and_ncut_losses": _crf,
    "atrous_conv2d": _atrous,
    "conv_transpose2d": _transpose,
}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_repeated_runs_agree(name, device):
    seed = _seed()
    runs = [CASES[name](seed, device, False) for _ in range(4)]
    for r in runs[1:]:
        for i, (a, b) in enumerate(zip(r, runs[0])):
            assert torch.isfinite(a).all(), "%s seed=%d result %d not finite" % (name, seed, i)
            if device == "cpu":
                assert torch.equal(a, b), "%s seed=%d: CPU result %d changed between runs" % (name, seed, i)
            else:
                err = _max_rel(a, b)
                assert err < 1e-10, "%s seed=%d: result %d changed between runs by %.3g" % (name, seed, i, err)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_parity_large(name):
    seed = _seed()
    cpu = CASES[name](seed, "cpu", True)
    gpu = CASES[name](seed, "cuda", True)
    for i, (a, b) in enumerate(zip(gpu, cpu)):
        assert a.shape == b.shape
        err = _max_rel(a, b)
        assert err < 1e-10, "%s seed=%d: CUDA result %d differs from the CPU by %.3g" % (name, seed, i, err)
