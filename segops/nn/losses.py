"""Loss modules over the fused segops loss ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from segops.ops.losses import entropy, partial_cross_entropy, reduction_code

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss"]


class PartialCrossEntropyLoss(nn.Module):
    """Cross-entropy over labelled pixels only (``ignore_index`` = unlabelled), fused.

    A drop-in for ``nn.CrossEntropyLoss(weight, ignore_index=255, reduction=..., label_smoothing=...)``
    on segmentation logits ``(B, K, H, W)`` and targets ``(B, H, W)``; ``'mean'`` over a batch without a
    labelled pixel is 0 rather than NaN. ``weight`` is a buffer (moves with ``.to()``, saved in the
    state_dict). ``check_labels``: see :func:`segops.ops.partial_cross_entropy` (CUDA's out-of-range label
    check: device-side assertion by default, ``True`` for a synchronous ``IndexError``).
    """

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        ignore_index: int = 255,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        check_labels: Optional[bool] = None,
    ) -> None:
        super().__init__()
        reduction_code(reduction)  # validate early
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError("label_smoothing must be in [0, 1], got %r" % (label_smoothing,))
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.check_labels = check_labels

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        weight = self.weight
        if weight is not None and weight.dtype != logits.dtype:
            weight = weight.to(logits.dtype)
        return partial_cross_entropy(
            logits, target, self.ignore_index, weight, self.reduction, self.label_smoothing, self.check_labels
        )

    def extra_repr(self) -> str:
        return "ignore_index=%d, reduction=%r, label_smoothing=%g" % (
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
        )


class EntropyLoss(nn.Module):
    """Pointwise Shannon entropy of ``softmax(logits)`` (nats), optionally over a pixel mask.

    ``forward(logits (B, K, *spatial), mask (B, *spatial) bool or None)``; multiply by a weight
    yourself (e.g. ``loss = pce + 0.1 * EntropyLoss()(logits)``).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        reduction_code(reduction)
        self.reduction = reduction

    def forward(self, logits: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return entropy(logits, mask, self.reduction)

    def extra_repr(self) -> str:
        return "reduction=%r" % (self.reduction,)
