"""Pure-PyTorch twins of every segops op: the ground truth of the tests and the baselines of the benchmarks.

They favour clarity and exactness over speed and memory (the lattice twins live in
:mod:`segops.reference_lattice` once that op exists).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def partial_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """``F.cross_entropy`` with ``ignore_index``; 'mean' with no labelled pixel gives 0 instead of NaN."""
    target = target.long()
    loss = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if reduction == "mean" and not bool((target != ignore_index).any()):
        # keeps the graph: zero loss, zero gradient; masked_fill (not logits * 0) so that NaN logits at
        # unlabelled pixels, which the loss never reads, do not make it NaN (found by tests/test_fuzz.py)
        return logits.masked_fill(torch.ones_like(logits, dtype=torch.bool), 0).sum()
    return loss


def entropy(logits: Tensor, mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Per-pixel Shannon entropy of softmax over dim 1 via log_softmax (nats)."""
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=1)
    # 0 log 0 = 0: a class with logit -inf has p = 0 and adds nothing (logp * p would be -inf * 0 = NaN)
    logp0 = logp.masked_fill(logp == float("-inf"), 0)
    h = -(logp.exp() * logp0).sum(1)
    if mask is not None:
        h = h * mask.to(h.dtype)
    if reduction == "none":
        return h.to(logits.dtype)
    if reduction == "sum":
        return h.sum().to(logits.dtype)
    count = mask.sum() if mask is not None else torch.tensor(h.numel(), device=h.device)
    if int(count) == 0:
        return h.sum().to(logits.dtype) * 0
    return (h.sum() / count).to(logits.dtype)


# ---- transposed / atrous convolution -------------------------------------------------------------------


def atrous_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1) -> Tensor:
    """Twin of :func:`segops.ops.atrous_conv2d`: ``F.conv2d`` (oneDNN / cuDNN)."""
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1) -> Tensor:
    """Twin of :func:`segops.ops.conv_transpose2d`: ``F.conv_transpose2d``."""
    return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)


# dense CRF inference (mean field)
def crf_mean_field_update(unary: Tensor, messages, scales, weights) -> Tensor:
    """Twin of ``segops.ops.crf_inference.crf_mean_field_update``: ``softmax over dim 1 of (-unary +
    sum_j weights[j] * scales[j] * messages[j])`` (a scale of None means 1), in torch ops and the unary's dtype."""
    logits = -unary
    for m, s, w in zip(messages, scales, weights):
        logits = logits + w * (m if s is None else s * m)
    return torch.softmax(logits, 1)


def half_resolution(x: Tensor) -> Tensor:
    """The CRF losses' scale-0.5 resize: ``x`` (B, C, H, W) -> (B, C, H // 2, W // 2)."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
