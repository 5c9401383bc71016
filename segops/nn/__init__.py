"""Modules built on the segops operators."""

from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss"]
