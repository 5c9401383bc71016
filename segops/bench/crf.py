"""Suite 'crf': DenseCRFLoss forward+backward vs the pure-PyTorch lattice twin, and 1 vs 2 threads.

Images are synthetic but image-like (a low-frequency colour field, a disc, noise of 4 grey levels), since
the lattice's cost depends on how many distinct lattice vertices the colours occupy; the settings are the
ECCV'18 ones (sigma_rgb = 15, sigma_xy = 80, K = 21 softmax maps).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from segops import reference_lattice
from segops.bench import BenchContext
from segops.nn import DenseCRFLoss


def synthetic_image(B: int, H: int, W: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) float in 0..255: bicubic-upsampled 8x8 colour field, a red disc, Gaussian noise (sd 4)."""
    low = F.interpolate(torch.rand(B, 3, 8, 8, generator=generator) * 255, size=(H, W), mode="bicubic",
                        align_corners=False)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    disc = (((yy - H / 2) ** 2 + (xx - W / 3) ** 2) < (H / 5) ** 2).float()
    img = low * (1 - disc) + disc * torch.tensor([200.0, 30.0, 40.0]).view(1, 3, 1, 1)
    return (img + torch.randn(B, 3, H, W, generator=generator) * 4).clamp(0, 255)


def _step(loss_fn, img, seg):
    def run() -> None:
        seg.grad = None
        loss_fn(img, seg).backward()

    return run


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    K = 21
    weight, srgb, sxy = 2e-9, 15.0, 80.0
    if ctx.quick:
        cases = [(1, 64, 1.0), (1, 64, 0.5)]
    elif ctx.device.type == "cuda":
        cases = [(1, 256, 1.0), (1, 512, 1.0), (12, 257, 1.0), (4, 512, 1.0), (4, 512, 0.5)]
    else:
        cases = [(B, S, s) for S in (256, 512) for B in (1, 4) for s in (1.0, 0.5)]
    rows: List[Dict[str, Any]] = []
    for B, S, scale in cases:
        img = synthetic_image(B, S, S, g).to(ctx.device)
        seg = torch.softmax(torch.randn(B, K, S, S, generator=g), 1).to(ctx.device).requires_grad_()
        ours = _step(DenseCRFLoss(weight, srgb, sxy, scale), img, seg)
        twin = _step(lambda i, s: reference_lattice.dense_crf_loss(i, s, weight, srgb, sxy, scale), img, seg)
        rows.append(dict(op="DenseCRFLoss fwd+bwd", case="B=%d %dx%d K=%d scale=%g" % (B, S, S, K, scale),
                         segops_ms=ctx.time_ms(ours), torch_ms=ctx.time_ms(twin),
                         segops_mem=ctx.peak_bytes(ours), torch_mem=ctx.peak_bytes(twin)))
    if ctx.device.type == "cuda":
        # The rloss comparison: its CRF loss runs on one CPU thread. "torch ms" column = segops on 1 CPU thread.
        S = 512
        img = synthetic_image(1, S, S, g)
        seg = torch.softmax(torch.randn(1, K, S, S, generator=g), 1)
        loss = DenseCRFLoss(weight, srgb, sxy, 1.0)
        gpu = _step(loss, img.to(ctx.device), seg.to(ctx.device).requires_grad_())
        cpu_ctx = BenchContext("cpu", ctx.quick, ctx.min_run_time)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = cpu_ctx.time_ms(_step(loss, img, seg.clone().requires_grad_()))
        finally:
            torch.set_num_threads(old)
        rows.append(dict(op="DenseCRFLoss GPU vs 1 CPU thread", case="B=1 %dx%d K=%d scale=1 (torch ms = segops, "
                         "1 CPU thread)" % (S, S, K), segops_ms=ctx.time_ms(gpu), torch_ms=one, cpu_1thread_ms=one))
    if ctx.device.type == "cpu":
        # Thread scaling of the kernel itself: "segops ms" = 2 threads, "torch ms" column = 1 thread.
        S = 64 if ctx.quick else 512
        img = synthetic_image(1, S, S, g)
        seg = torch.softmax(torch.randn(1, K, S, S, generator=g), 1).requires_grad_()
        ours = _step(DenseCRFLoss(weight, srgb, sxy, 1.0), img, seg)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = ctx.time_ms(ours)
            torch.set_num_threads(2)
            two = ctx.time_ms(ours)
        finally:
            torch.set_num_threads(old)
        rows.append(dict(op="DenseCRFLoss threads 2 vs 1", case="B=1 %dx%d K=%d scale=1 (torch ms = 1 thread)"
                         % (S, S, K), segops_ms=two, torch_ms=one, threads_1_ms=one, threads_2_ms=two))
    return rows
