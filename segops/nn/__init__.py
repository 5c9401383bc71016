"""Modules built on the segops operators."""

from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss
from segops.nn import init  # temporary shim (models branch), replaced by the conv branch at merge
from segops.nn.conv import AtrousConv2d, ConvTranspose2d  # temporary shim (models branch), replaced by the conv branch at merge

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss", "AtrousConv2d", "ConvTranspose2d", "init"]
