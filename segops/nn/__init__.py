"""Modules built on the segops operators."""

from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss
from segops.nn import init
from segops.nn.conv import AtrousConv2d, ConvTranspose2d

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss", "AtrousConv2d", "ConvTranspose2d", "init"]
