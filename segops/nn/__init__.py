"""Modules built on the segops operators."""

from segops.nn import init
from segops.nn.aspp import ASPP
from segops.nn.conv import AtrousConv2d, ConvTranspose2d
from segops.nn.crf import DenseCRFLoss, NormalizedCutLoss
from segops.nn.describe import describe_kernels
from segops.nn.losses import EntropyLoss, PartialCrossEntropyLoss
# dense CRF inference (mean field)
from segops.nn.dense_crf import DenseCRF

__all__ = [
    "PartialCrossEntropyLoss",
    "EntropyLoss",
    "DenseCRFLoss",
    "NormalizedCutLoss",
    "AtrousConv2d",
    "ConvTranspose2d",
    "ASPP",
    "describe_kernels",
    "init",
    # dense CRF inference
    "DenseCRF",
]
