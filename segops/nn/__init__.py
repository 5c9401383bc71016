"""Modules built on the segops operators."""

from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss
from segops.nn.crf import DenseCRFLoss, NormalizedCutLoss

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss", "DenseCRFLoss", "NormalizedCutLoss"]
