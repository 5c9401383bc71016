"""Fused softmax losses: partial cross-entropy (scribble supervision) and pointwise entropy.

Both ops read each logit once in the forward pass (streaming max / log-sum-exp) and keep only one or two
floats per pixel for the backward pass, instead of a K-channel log-softmax. Each direction is one kernel
launch (one parallel region on the CPU), the loss reduced inside it in a fixed order, so results are
bitwise reproducible; on CUDA no call waits for the device.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from segops.ops._checks import check_same_device

__all__ = ["partial_cross_entropy", "entropy", "reduction_code", "CHECK_LABELS_ENV"]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# Environment variable: "1" makes check_labels=True the default of partial_cross_entropy (read once, at import).
CHECK_LABELS_ENV = "SEGOPS_CHECK_LABELS"
_CHECK_LABELS_DEFAULT = os.environ.get(CHECK_LABELS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def reduction_code(reduction: str) -> int:
    """Maps 'none' | 'mean' | 'sum' to the integer the C++ ops take."""
    try:
        return _REDUCTIONS[reduction]
    except KeyError:
        raise ValueError("reduction must be one of 'none', 'mean', 'sum', got %r" % (reduction,)) from None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_bks_like(t: Tensor) -> Tensor:
    """Mirrors the C++ gradient allocation: t's layout if contiguous or channels_last, else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(t, memory_format=torch.channels_last)
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.empty_like(t, memory_format=torch.channels_last_3d)
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---- partial cross-entropy ------------------------------------------------------------------------------


def partial_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    check_labels: Optional[bool] = None,
) -> Tensor:
    """Fused softmax + negative log-likelihood over the labelled pixels only.

    Args:
        logits: ``(B, K, *spatial)`` or ``(B, K)`` float32 / float64 / float16 / bfloat16 class scores
            (any strides; channels_last works without a copy). half / bfloat16 accumulate in float32.
        target: ``(B, *spatial)`` int64 or uint8 class indices in ``[0, K)``; ``ignore_index`` marks
            unlabelled pixels (255 for scribbles), whose logits never reach the result (NaN there is harmless).
        ignore_index: label of unlabelled / void pixels.
        weight: optional ``(K,)`` per-class rescaling weight, same dtype and device as ``logits``.
        reduction: ``'none'`` (``(B, *spatial)`` losses, 0 at ignored pixels), ``'mean'`` or ``'sum'``.
        label_smoothing: in ``[0, 1]``, as in :func:`torch.nn.functional.cross_entropy`.
        check_labels: CUDA only (the CPU always checks): ``True`` raises :class:`IndexError` for an
            out-of-range target, at the cost of one host synchronisation per call; ``False`` lets the kernel
            stop with a device-side assertion instead, PyTorch's own convention for ``nll_loss``, which
            surfaces as an asynchronous ``RuntimeError`` ("device-side assert triggered") and leaves the CUDA
            context unusable. ``None`` (default): ``True`` when the environment variable
            ``SEGOPS_CHECK_LABELS=1`` was set when segops was imported, else ``False``.

    Returns:
        The loss, equal to ``F.cross_entropy(logits, target, weight, ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing)`` except that ``'mean'`` over a batch
        with no labelled pixel is 0 (with zero gradient) instead of NaN.

    Raises:
        IndexError: a target value is outside ``[0, K)`` and is not ``ignore_index`` (on CUDA only with
            ``check_labels``); the message names the value and the first such pixel.
        RuntimeError / ValueError: wrong shapes, dtypes, devices or arguments (the message names which).
    """
    if check_labels is None:
        check_labels = _CHECK_LABELS_DEFAULT
    loss, _, _ = torch.ops.segops.partial_cross_entropy.default(
        logits, target, weight, reduction_code(reduction), int(ignore_index), float(label_smoothing), bool(check_labels)
    )
    return loss


@torch.library.register_fake("segops::partial_cross_entropy")
def _pce_fake(logits, target, weight, reduction, ignore_index, label_smoothing, check_labels=False):
    torch._check(logits.dim() >= 2, lambda: "partial_cross_entropy: logits must be (B, K, *spatial)")
    torch._check(target.dim() == logits.dim() - 1, lambda: "partial_cross_entropy: target must be (B, *spatial)")
    torch._check(
        target.device == logits.device,
        lambda: "partial_cross_entropy: target is on %s but logits are on %s" % (target.device, logits.device),
    )
    check_same_device("partial_cross_entropy", "logits", logits, weight=weight)
    acc = _acc_dtype(logits.dtype)
    loss = logits.new_empty(target.shape) if reduction == 0 else logits.new_empty(())
    return loss, logits.new_empty((target.numel(),), dtype=acc), logits.new_empty((1,), dtype=acc)


@torch.library.register_fake("segops::_partial_cross_entropy_backward")
def _pce_backward_fake(grad, logits, target, weight, lse, denom, reduction, ignore_index, label_smoothing):
    return _empty_bks_like(logits)


def _pce_setup_context(ctx, inputs, output) -> None:
    logits, target, weight, reduction, ignore_index, label_smoothing = inputs[:6]
    _, lse, denom = output
    # lse and denom are state for backward, not results: no gradient flows into them, and autograd must not
    # materialise zero gradients for them (two fills per backward call, one of them pixel-sized).
    ctx.mark_non_differentiable(lse, denom)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, weight, lse, denom)
    ctx.args = (reduction, ignore_index, label_smoothing)


def _pce_backward(ctx, grad_loss: Tensor, _grad_lse: Tensor, _grad_denom: Tensor):
    logits, target, weight, lse, denom = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_loss is not None:
        grad_logits = torch.ops.segops._partial_cross_entropy_backward.default(
            grad_loss, logits, target, weight, lse, denom, *ctx.args
        )
    return (grad_logits,) + (None,) * 6


torch.library.register_autograd(
    "segops::partial_cross_entropy", _pce_backward, setup_context=_pce_setup_context
)


# ---- entropy ----------------------------------------------------------------------------------------------


def entropy(logits: Tensor, mask: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Shannon entropy of ``softmax(logits)`` over the class dim, per pixel, fused.

    ``H = -sum_k p_k log p_k`` in nats, with ``p = softmax(logits, dim=1)``; the "pointwise entropy
    regularization" of weakly-supervised segmentation (minimising it sharpens predictions).

    Args:
        logits: ``(B, K, *spatial)`` or ``(B, K)`` floating class scores.
        mask: optional ``(B, *spatial)`` bool (other dtypes: nonzero = True); only pixels where it is
            True count, the others contribute 0 and get zero gradient.
        reduction: ``'none'`` (``(B, *spatial)``), ``'mean'`` (over counted pixels; 0 when none) or ``'sum'``.
    """
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    out, _, _, _ = torch.ops.segops.entropy.default(logits, mask, reduction_code(reduction))
    return out


@torch.library.register_fake("segops::entropy")
def _entropy_fake(logits, mask, reduction):
    torch._check(logits.dim() >= 2, lambda: "entropy: logits must be (B, K, *spatial)")
    check_same_device("entropy", "logits", logits, mask=mask)
    acc = _acc_dtype(logits.dtype)
    pixel_shape = logits.shape[:1] + logits.shape[2:]
    n = 1
    for size in pixel_shape:
        n = n * size
    out = logits.new_empty(pixel_shape) if reduction == 0 else logits.new_empty(())
    return out, logits.new_empty((n,), dtype=acc), logits.new_empty((n,), dtype=acc), logits.new_empty((1,), dtype=acc)


@torch.library.register_fake("segops::_entropy_backward")
def _entropy_backward_fake(grad, logits, mask, lse, expectation, denom, reduction):
    return _empty_bks_like(logits)


def _entropy_setup_context(ctx, inputs, output) -> None:
    logits, mask, reduction = inputs
    _, lse, ex, denom = output
    ctx.mark_non_differentiable(lse, ex, denom)  # as for partial_cross_entropy
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, mask, lse, ex, denom)
    ctx.reduction = reduction


def _entropy_backward(ctx, grad_out: Tensor, *_unused: Tuple[Tensor, ...]):
    logits, mask, lse, ex, denom = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_logits = torch.ops.segops._entropy_backward.default(grad_out, logits, mask, lse, ex, denom, ctx.reduction)
    return grad_logits, None, None


torch.library.register_autograd("segops::entropy", _entropy_backward, setup_context=_entropy_setup_context)
