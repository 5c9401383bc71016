"""Suite 'losses': fused partial cross-entropy and entropy vs F.cross_entropy / log_softmax entropy."""

from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from segops import ops
from segops.bench import BenchContext, fwd_bwd, saved_bytes


def scribble_target(B: int, K: int, H: int, W: int, labelled: float, device, generator) -> torch.Tensor:
    """(B,H,W) int64 labels with a `labelled` fraction of pixels in [0,K), the rest 255."""
    target = torch.randint(0, K, (B, H, W), generator=generator)
    keep = torch.rand((B, H, W), generator=generator) < labelled
    return torch.where(keep, target, torch.full_like(target, 255)).to(device)


def _torch_entropy(x: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(x, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def run(ctx: BenchContext) -> List[Dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    if ctx.quick:
        shapes = [(2, 21, 64, 64)]
    elif ctx.device.type == "cuda":
        shapes = [(8, 21, 256, 256), (16, 21, 512, 512)]
    else:
        shapes = [(8, 21, 256, 256)]
    rows: List[Dict[str, Any]] = []
    for B, K, H, W in shapes:
        logits = torch.randn(B, K, H, W, generator=g).mul_(3).to(ctx.device).requires_grad_()
        for frac in (0.03, 1.0):
            target = scribble_target(B, K, H, W, frac, ctx.device, g)
            case = "%dx%dx%dx%d %d%% labelled" % (B, K, H, W, round(frac * 100))
            ours = fwd_bwd(lambda x: ops.partial_cross_entropy(x, target), logits)
            theirs = fwd_bwd(lambda x: F.cross_entropy(x, target, ignore_index=255), logits)
            rows.append(
                dict(
                    op="partial_cross_entropy",
                    case=case,
                    segops_ms=ctx.time_ms(ours),
                    torch_ms=ctx.time_ms(theirs),
                    segops_mem=ctx.peak_bytes(ours),
                    torch_mem=ctx.peak_bytes(theirs),
                    segops_saved_bytes=saved_bytes(lambda: ops.partial_cross_entropy(logits, target), [logits, target]),
                    torch_saved_bytes=saved_bytes(
                        lambda: F.cross_entropy(logits, target, ignore_index=255), [logits, target]
                    ),
                )
            )
        case = "%dx%dx%dx%d" % (B, K, H, W)
        ours = fwd_bwd(lambda x: ops.entropy(x), logits)
        theirs = fwd_bwd(_torch_entropy, logits)
        rows.append(
            dict(
                op="entropy",
                case=case,
                segops_ms=ctx.time_ms(ours),
                torch_ms=ctx.time_ms(theirs),
                segops_mem=ctx.peak_bytes(ours),
                torch_mem=ctx.peak_bytes(theirs),
                segops_saved_bytes=saved_bytes(lambda: ops.entropy(logits), [logits]),
                torch_saved_bytes=saved_bytes(lambda: _torch_entropy(logits), [logits]),
            )
        )
    return rows
