"""Suite 'conv': atrous_conv2d / conv_transpose2d forward+backward vs torch (F.conv2d / F.conv_transpose2d,
i.e. oneDNN / native kernels on the CPU, cuDNN on CUDA), on segmentation shapes.

CPU default (about 2 minutes on 2 cores): ASPP and LargeFOV at 33x33 batch 4 (65x65 at batch 1), FCN
upsampling at batch 4, U-Net at batch 2. CUDA: the issue's shapes (ASPP/LargeFOV at batch 4 on 33x33 and
65x65). ``--quick``: tiny shapes, smoke test only.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from segops import ops
from segops.bench import BenchContext, cudnn_full_fp32
from segops.nn import ConvTranspose2d


def _step(fn: Callable[..., torch.Tensor], leaves: List[torch.Tensor], gout: Optional[torch.Tensor]):
    def step() -> None:
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(gout)

    return step


def _row(ctx: BenchContext, op: str, case: str, ours, theirs) -> Dict[str, Any]:
    return dict(op=op, case=case, segops_ms=ctx.time_ms(ours), torch_ms=ctx.time_ms(theirs),
                segops_mem=ctx.peak_bytes(ours), torch_mem=ctx.peak_bytes(theirs))


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    with cudnn_full_fp32():
        return _run(ctx)


def _run(ctx: BenchContext) -> List[Dict[str, Any]]:
    dev = ctx.device
    gen = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev)

    rows: List[Dict[str, Any]] = []

    # ---- dense atrous: DeepLab ASPP branches and LargeFOV fc6 ----
    if ctx.quick:
        dense = [("aspp r6", 1, 64, 32, 17, 6)]
    elif cuda:
        dense = [("aspp r%d" % r, 4, 512, 256, hw, r) for hw in (33, 65) for r in (6, 12, 18, 24)]
        dense += [("largefov fc6 r12", 4, 512, 1024, hw, 12) for hw in (33, 65)]
    else:
        dense = [("aspp r%d" % r, 4, 512, 256, 33, r) for r in (6, 12, 18, 24)]
        dense += [("aspp r12", 1, 512, 256, 65, 12), ("largefov fc6 r12", 1, 512, 1024, 33, 12)]
    for name, B, cin, cout, hw, r in dense:
        x = rnd(B, cin, hw, hw).requires_grad_()
        w = rnd(cout, cin, 3, 3, scale=0.02).requires_grad_()
        b = rnd(cout).requires_grad_()
        gout = rnd(B, cout, hw, hw)
        ours = _step(lambda: ops.atrous_conv2d(x, w, b, 1, r, r), [x, w, b], gout)
        theirs = _step(lambda: F.conv2d(x, w, b, 1, r, r), [x, w, b], gout)
        rows.append(_row(ctx, "atrous_conv2d", "%s %dx%d->%d %dx%d" % (name, B, cin, cout, hw, hw), ours, theirs))
        del x, w, b, gout

    # ---- FCN score upsampling on K=21 maps: depthwise learnable, and the fixed bilinear layer ----
    K = 21
    if ctx.quick:
        ups = [(2, 2, 8)]
    else:
        ups = [(2, 4, 16), (8, 4, 64), (32, 4, 16)]  # (factor, batch, input size): x8 64->512, x32 16->512
    for s, B, hw in ups:
        k, p = 2 * s, s // 2
        x = rnd(B, K, hw, hw).requires_grad_()
        wd = rnd(K, 1, k, k).requires_grad_()
        ho = (hw - 1) * s - 2 * p + k
        gout = rnd(B, K, ho, ho)
        ours = _step(lambda: ops.conv_transpose2d(x, wd, None, s, p, groups=K), [x, wd], gout)
        theirs = _step(lambda: F.conv_transpose2d(x, wd, None, s, p, groups=K), [x, wd], gout)
        rows.append(_row(ctx, "conv_transpose2d depthwise", "x%d %dx%dx%dx%d k%d" % (s, B, K, hw, hw, k), ours, theirs))
        mine = ConvTranspose2d(K, K, k, s, p, bias=False, init="bilinear", trainable=False).to(dev)
        ref = torch.nn.ConvTranspose2d(K, K, k, s, p, bias=False).to(dev).requires_grad_(False)
        ref.load_state_dict(mine.state_dict())
        ours = _step(lambda: mine(x), [x], gout)
        theirs = _step(lambda: ref(x), [x], gout)
        rows.append(_row(ctx, "fixed bilinear (FCN, groups=1)", "x%d %dx%dx%dx%d k%d" % (s, B, K, hw, hw, k),
                         ours, theirs))
        del x, wd, gout

    # ---- U-Net 2x2 stride-2 up-convolutions ----
    if ctx.quick:
        unet = [(1, 64, 32, 16)]
    elif cuda:
        unet = [(8, 1024, 512, 32), (8, 512, 256, 64), (8, 256, 128, 128), (8, 128, 64, 256)]
    else:
        unet = [(2, 1024, 512, 28), (2, 512, 256, 56), (2, 128, 64, 224)]
    for B, cin, cout, hw in unet:
        x = rnd(B, cin, hw, hw).requires_grad_()
        w = rnd(cin, cout, 2, 2, scale=0.02).requires_grad_()
        b = rnd(cout).requires_grad_()
        gout = rnd(B, cout, 2 * hw, 2 * hw)
        ours = _step(lambda: ops.conv_transpose2d(x, w, b, 2), [x, w, b], gout)
        theirs = _step(lambda: F.conv_transpose2d(x, w, b, 2), [x, w, b], gout)
        rows.append(_row(ctx, "conv_transpose2d unet 2x2/2", "%dx%d->%d %dx%d" % (B, cin, cout, hw, hw), ours, theirs))
        del x, w, b, gout
    return rows
