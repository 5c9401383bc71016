"""Modules built on the segops operators."""

from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss
from segops.nn import init  # temporary shim (models branch), replaced by the conv branch at merge
from segops.nn.conv import AtrousConv2d, ConvTranspose2d  # temporary shim (models branch), replaced by the conv branch at merge

__all__ = ["PartialCrossEntropyLoss", "EntropyLoss", "AtrousConv2d", "ConvTranspose2d", "init"]

# models branch: DeepLab ASPP (v2 sum-of-branches, v3 concat + image pooling)
from segops.nn.aspp import ASPP  # noqa: E402

__all__ += ["ASPP"]
